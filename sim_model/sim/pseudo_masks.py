"""SIM's pseudo masks: instance map, rectification, thresholds, pseudo-mask loss and mask score.

One function per equation of SIM (CVPR 2023, §3.2.2 and supplement §6.1), and
:func:`sim_pseudo_masks`, the chain Eq. 6 → 1 → 7 → 8 → 11 that turns an object's positives into its
pseudo mask: the training step builds its pseudo labels with it on the mask grid, and the SIM engine
builds its answer with it in image pixels.

- :func:`positive_weights` — Eq. 6, ``w_pos = exp(µ·IoU(pred box, gt box))`` normalised over the
  object's positives;
- :func:`instance_map` — Eq. 6, M_I = Σ w_pos · mask_pos;
- :func:`rectify` — Eq. 7, M̂_prob = (1 − α)·M_S + α·M_I;
- :func:`threshold_pseudo_mask` — Eq. 8, M̂ = 1 where M̂_prob ≥ τ_high, 0 where ≤ τ_low, ignored between;
- :func:`pseudo_mask_loss` — ℓ_mask of Eq. 8/9: BCE + Dice, ignoring weight-0 pixels;
- :func:`mask_score` — Eq. 11, S_k = mean of M̂_prob over the pixels where M̂ = 1.

Config keys (``sim_model/config.py``): ``MODEL.SIM.INSTANCE_MAP_MU`` (µ, paper 5.0, Table 6),
``MODEL.SIM.RECTIFY_ALPHA`` (α, paper 0.5, Table 4), ``MODEL.SIM.THRESH_LOW`` /
``MODEL.SIM.THRESH_HIGH`` (τ_low 0.3, τ_high 0.7, Table 7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from sim_model.losses.dice import dice_loss
from sim_model.sim.prototypes import ClassPrototypes


def positive_weights(pred_boxes: torch.Tensor, gt_box: torch.Tensor, mu: float) -> torch.Tensor:
    """Quality weights of an object's positive locations (SIM Eq. 6).

    ``w_pos = exp(µ · IoU(pred_box_pos, gt_box))``, normalised to sum to 1 over the positives
    (computed as a softmax of µ·IoU, which is the same thing without overflow).

    Args:
        pred_boxes: (P, 4) float XYXY in pixels, the boxes regressed at the object's P positives.
        gt_box: (4,) float XYXY in pixels, the object's (ground-truth or drawn) box.
        mu: µ (``MODEL.SIM.INSTANCE_MAP_MU``, paper 5.0); µ = 0 weighs all positives equally.

    Returns:
        (P,) float weights, non-negative, summing to 1 (empty when P = 0).

    Raises:
        ValueError: if the shapes are not (P, 4) and (4,).
    """
    if pred_boxes.dim() != 2 or pred_boxes.shape[1] != 4:
        raise ValueError(f"pred_boxes must be (P, 4), got shape {tuple(pred_boxes.shape)}")
    gt_box = torch.as_tensor(gt_box, dtype=pred_boxes.dtype, device=pred_boxes.device)
    if gt_box.shape != (4,):
        raise ValueError(f"gt_box must be (4,), got shape {tuple(gt_box.shape)}")
    if pred_boxes.shape[0] == 0:
        return pred_boxes.new_zeros((0,))
    iou = box_iou(pred_boxes, gt_box[None])[:, 0]
    return torch.softmax(mu * iou, dim=0)


def instance_map(mask_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Instance map M_I: the quality-weighted sum of the positives' masks (SIM Eq. 6).

    Args:
        mask_probs: (P, H, W) float mask probabilities of the object's P positives.
        weights: (P,) float weights from :func:`positive_weights` (summing to 1).

    Returns:
        (H, W) float M_I in [0, 1] when the weights sum to 1; zeros when P = 0.

    Raises:
        ValueError: if the shapes disagree.
    """
    if mask_probs.dim() != 3 or weights.dim() != 1 or weights.shape[0] != mask_probs.shape[0]:
        raise ValueError(f"mask_probs (P, H, W) and weights (P,) disagree: {tuple(mask_probs.shape)}, "
                         f"{tuple(weights.shape)}")
    return torch.einsum("p,phw->hw", weights.to(mask_probs.dtype), mask_probs)


def rectify(m_s: torch.Tensor, m_i: torch.Tensor, alpha: float,
            semantic_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified pseudo probability map M̂_prob = (1 − α)·M_S + α·M_I (SIM Eq. 7).

    Args:
        m_s: (..., H, W) semantic map M_S (probabilities), e.g. (K, H, W).
        m_i: instance map M_I, same shape as ``m_s``.
        alpha: α in [0, 1] (``MODEL.SIM.RECTIFY_ALPHA``, paper 0.5).
        semantic_valid: optional bool tensor of ``m_s``'s leading shape (e.g. (K,)); where False the
            class has no prototypes yet and the result is M_I alone.

    Returns:
        M̂_prob, same shape as the inputs, in [0, 1].

    Raises:
        ValueError: if alpha is outside [0, 1] or the shapes differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if m_s.shape != m_i.shape:
        raise ValueError(f"M_S {tuple(m_s.shape)} and M_I {tuple(m_i.shape)} differ in shape")
    out = (1.0 - alpha) * m_s + alpha * m_i
    if semantic_valid is not None:
        valid = torch.as_tensor(semantic_valid, dtype=torch.bool, device=m_i.device)
        valid = valid.reshape(valid.shape + (1,) * (m_i.dim() - valid.dim()))
        out = torch.where(valid, out, m_i)
    return out


def threshold_pseudo_mask(m_prob: torch.Tensor, tau_low: float, tau_high: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo mask M̂ and its loss weight W from the two thresholds (SIM Eq. 8).

    Args:
        m_prob: (...) float M̂_prob in [0, 1].
        tau_low: τ_low (``MODEL.SIM.THRESH_LOW``, paper 0.3).
        tau_high: τ_high (``MODEL.SIM.THRESH_HIGH``, paper 0.7).

    Returns:
        target: float {0, 1}, 1 where ``m_prob >= tau_high``.
        weight: float {0, 1}, 0 where ``tau_low < m_prob < tau_high`` (ambiguous pixels), else 1.

    Raises:
        ValueError: if ``tau_low > tau_high``.
    """
    if tau_low > tau_high:
        raise ValueError(f"tau_low ({tau_low}) must be <= tau_high ({tau_high})")
    fg = m_prob >= tau_high
    target = fg.to(m_prob.dtype)
    weight = (fg | (m_prob <= tau_low)).to(m_prob.dtype)
    return target, weight


def pseudo_mask_loss(mask_logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                     bce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.Tensor:
    """ℓ_mask of SIM Eq. 8 (and Eq. 9): BCE + Dice between mask logits and pseudo masks, with an ignore mask.

    For each instance k, over its pixels with ``weight == 1``: the binary cross-entropy is computed
    once from the logits (``binary_cross_entropy_with_logits``; the official code applied a sigmoid
    twice) and averaged over the kept pixels; the Dice loss is
    ``1 − 2 Σ p·t / (Σ p² + Σ t² + eps)`` with p = σ(logit) (AdelaiDet's form). The result is the
    mean of (bce_weight·BCE + dice_weight·Dice) over instances that have at least one kept pixel (Eq. 8's 1/N_pos).
    Pixels with weight 0 change neither the value nor the gradient.

    Args:
        mask_logits: (K, H, W) (or (K, P)) float mask logits of K positives / pasted instances.
        target: same shape, float {0, 1} pseudo masks M̂ (:func:`threshold_pseudo_mask`).
        weight: same shape, float {0, 1} W; all ones for copy-paste's Eq. 9.
        bce_weight: ``MODEL.SIM.PSEUDO_LOSS.BCE_WEIGHT`` (1.0).
        dice_weight: ``MODEL.SIM.PSEUDO_LOSS.DICE_WEIGHT`` (1.0).

    Returns:
        Scalar loss. With K = 0 or no kept pixel at all, ``mask_logits.sum() * 0`` (keeps the graph).

    Raises:
        ValueError: if the shapes differ.
    """
    if mask_logits.shape != target.shape or mask_logits.shape != weight.shape:
        raise ValueError(f"mask_logits {tuple(mask_logits.shape)}, target {tuple(target.shape)} and weight "
                         f"{tuple(weight.shape)} must have the same shape")
    if mask_logits.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits.flatten(1)
    t = target.flatten(1).to(logits.dtype)
    w = weight.flatten(1).to(logits.dtype)
    kept = w.sum(dim=1)
    has = kept > 0
    if not bool(has.any()):
        return mask_logits.sum() * 0
    logits, t, w, kept = logits[has], t[has], w[has], kept[has]
    bce = (F.binary_cross_entropy_with_logits(logits, t, reduction="none") * w).sum(dim=1) / kept
    dice = dice_loss(torch.sigmoid(logits) * w, t * w)
    return (bce_weight * bce + dice_weight * dice).mean()


def mask_score(m_prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mask score S_k: mean of M̂_prob over the pixels where M̂ = 1 (SIM supplement Eq. 11).

    Args:
        m_prob: (K, H, W) float M̂_prob (or (H, W) for one instance).
        target: same shape, M̂ (float {0, 1} or bool).

    Returns:
        (K,) float S_k in [0, 1] (a 0-d tensor for a single (H, W) map); 0 for an instance with no
        foreground pixel.

    Raises:
        ValueError: if the shapes differ.
    """
    if m_prob.shape != target.shape:
        raise ValueError(f"m_prob {tuple(m_prob.shape)} and target {tuple(target.shape)} differ in shape")
    single = m_prob.dim() == 2
    p = m_prob.reshape(1, -1) if single else m_prob.flatten(1)
    fg = (target.reshape(1, -1) if single else target.flatten(1)) > 0.5
    n = fg.sum(dim=1)
    s = (p * fg.to(p.dtype)).sum(dim=1) / n.clamp_min(1).to(p.dtype)
    return s[0] if single else s


@dataclass
class PseudoMasks:
    """SIM's pseudo masks of K objects (:func:`sim_pseudo_masks`).

    Attributes:
        instance_map: (K, Hg, Wg) float M_I on the mask grid (Eq. 6).
        prob: (K, h, w) float M̂_prob (Eq. 7), resampled to the output grid and restricted to the region.
        target: (K, h, w) float {0, 1} pseudo mask M̂ (Eq. 8).
        weight: (K, h, w) float {0, 1} loss weight W, 0 on ambiguous pixels (Eq. 8).
        score: (K,) float mask score S_k (Eq. 11).
    """

    instance_map: torch.Tensor
    prob: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    score: torch.Tensor


def sim_pseudo_masks(pos_probs: torch.Tensor, pos_boxes: torch.Tensor, pos_object: torch.Tensor,
                     gt_boxes: torch.Tensor, features: torch.Tensor, class_ids: torch.Tensor,
                     prototypes: ClassPrototypes | None, *, mu: float, alpha: float, tau: float, tau_low: float,
                     tau_high: float, region: torch.Tensor | None = None,
                     resample: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PseudoMasks:
    """SIM's pseudo-mask chain for K objects (§3.2.2): Eq. 6 → 1 → 7 → 8 → 11.

    1. M_I (Eq. 6, :func:`positive_weights`, :func:`instance_map`): the masks of object k's positives
       (``pos_object == k``) weighted by softmax(µ·IoU(positive's box, object's box)); 0 without positives.
    2. M_S (Eq. 1, :meth:`ClassPrototypes.semantic_map`): the object's class prototypes against the
       features. A class without prototypes (never updated, an unknown label ``class_id < 0``, or
       ``prototypes`` None) has no M_S.
    3. M̂_prob = (1 − α)·M_S + α·M_I (Eq. 7, :func:`rectify`), M_I alone where M_S is missing.
    4. ``resample`` (e.g. from the mask grid to image pixels), then × ``region`` (where the object may lie).
    5. M̂ and W from τ_low / τ_high (Eq. 8, :func:`threshold_pseudo_mask`), S_k (Eq. 11, :func:`mask_score`).

    Args:
        pos_probs: (P, Hg, Wg) float mask probabilities of the positive locations on the mask grid.
        pos_boxes: (P, 4) float XYXY pixels, the boxes regressed at the positives.
        pos_object: (P,) long, the object each positive belongs to (-1: none of these K objects).
        gt_boxes: (K, 4) float XYXY pixels of the objects (same frame as ``pos_boxes``).
        features: (D, Hg, Wg) features of one image shared by all objects, or (K, D, Hg, Wg) per object;
            L2-normalised along D (the mask features Z, from the momentum teacher in training).
        class_ids: (K,) long class ids, -1 for a label the model does not know.
        prototypes: the class prototypes, or None (no M_S).
        mu: µ of Eq. 6 (``MODEL.SIM.INSTANCE_MAP_MU``, paper 5.0).
        alpha: α of Eq. 7 (``MODEL.SIM.RECTIFY_ALPHA``, paper 0.5).
        tau: τ of Eq. 1 (``MODEL.SIM.PROTOTYPES.TEMPERATURE``, paper 1.0).
        tau_low, tau_high: thresholds of Eq. 8 (``MODEL.SIM.THRESH_LOW`` / ``THRESH_HIGH``, 0.3 / 0.7).
        region: (K, h, w) float {0, 1} on the output grid; None = everywhere.
        resample: maps (K, Hg, Wg) maps to the (K, h, w) output grid; None = the mask grid itself.

    Returns:
        :class:`PseudoMasks`.

    Raises:
        ValueError: shapes that disagree.
    """
    k = gt_boxes.shape[0]
    if pos_probs.dim() != 3 or pos_boxes.shape != (pos_probs.shape[0], 4) or pos_object.shape != (pos_probs.shape[0],):
        raise ValueError(f"positives disagree: probs {tuple(pos_probs.shape)}, boxes {tuple(pos_boxes.shape)}, "
                         f"objects {tuple(pos_object.shape)}")
    if class_ids.shape != (k,):
        raise ValueError(f"{k} objects but class ids of shape {tuple(class_ids.shape)}")
    grid = pos_probs.shape[1:]
    m_i = pos_probs.new_zeros((k,) + tuple(grid))
    for obj in range(k):
        sel = pos_object == obj
        if bool(sel.any()):
            m_i[obj] = instance_map(pos_probs[sel], positive_weights(pos_boxes[sel], gt_boxes[obj], mu))
    m_s = torch.zeros_like(m_i)
    valid = torch.zeros(k, dtype=torch.bool, device=m_i.device)
    known = torch.nonzero(class_ids >= 0).squeeze(1)
    if prototypes is not None and known.numel():
        z = features if features.dim() == 3 else features[known]
        ms_k, valid_k = prototypes.semantic_map(z, class_ids[known].to(prototypes.prototypes.device), tau)
        m_s[known] = ms_k.to(m_s.device, m_s.dtype)
        valid[known] = valid_k.to(valid.device)
    prob = rectify(m_s, m_i, alpha, valid)
    if resample is not None:
        prob = resample(prob)
    if region is not None:
        prob = prob * region
    target, weight = threshold_pseudo_mask(prob, tau_low, tau_high)
    return PseudoMasks(instance_map=m_i, prob=prob, target=target, weight=weight, score=mask_score(prob, target))
