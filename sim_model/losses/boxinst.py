"""BoxInst's box-supervised mask losses (Tian et al., CVPR 2021), as free functions on tensors.

Preparation is kept apart from the losses (mmdet 3.x style): :func:`prepare_boxinst_targets` builds,
once per batch and before the head runs, the box masks at the mask-output stride and the LAB colour
similarities of every pixel with its neighbours; :func:`projection_loss` and :func:`pairwise_loss`
only consume them.

- projection loss: Dice between the max-projections onto x and onto y of the predicted mask
  probabilities and of the box mask (BoxInst Eq. 2);
- pairwise loss: for each pixel and each of its 8 neighbours in a 3x3 window with dilation 2, the
  negative log-probability that both carry the same label, averaged over the pairs inside the box
  whose colour similarity ``exp(-||Δlab|| · 0.5)`` reaches a threshold (BoxInst Eq. 3–4).

The LAB conversion (:func:`rgb_to_lab`) is batched torch code on the images' device (the official SIM
code converted per image on the CPU with scikit-image inside the loss). :func:`feature_similarity` is
the official SIM code's variant of the pairwise affinity (the momentum teacher's mask features), and
:func:`boxinst_losses` assembles both losses with their weights and warm-up.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from sim_model.boxes import box_masks
from sim_model.config import BoxInstSettings
from sim_model.losses.dice import dice_loss

# sRGB (D65) -> XYZ matrix and the D65 white point, as in scikit-image's rgb2lab.
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """Convert sRGB images to CIE LAB (D65 white), batched, on the input's device.

    Same formulas as ``skimage.color.rgb2lab``: sRGB gamma expansion, linear RGB -> XYZ, XYZ
    normalised by the D65 white, cube root with the linear segment below (6/29)^3.

    Args:
        images: (N, 3, H, W) float RGB in [0, 255] (channel order R, G, B).

    Returns:
        (N, 3, H, W) float32 L in [0, 100], a and b roughly in [-128, 127].

    Raises:
        ValueError: if ``images`` is not (N, 3, H, W).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) RGB, got shape {tuple(images.shape)}")
    rgb = images.float().clamp(0, 255) / 255.0
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = _RGB_TO_XYZ.to(lin.device)
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    xyz = xyz / _WHITE_D65.to(lin.device)[None, :, None, None]
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta ** 3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta ** 2) + 4.0 / 29.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    lab = torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)
    return lab


def unfold_wo_center(x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Neighbours of every pixel in a ``kernel_size`` window with ``dilation``, centre excluded.

    Args:
        x: (N, C, H, W) float.
        kernel_size: odd window side (BoxInst: 3).
        dilation: spacing of the window (BoxInst: 2).

    Returns:
        (N, C, K*K - 1, H, W): entry ``[:, :, j, y, x]`` is the j-th neighbour of pixel (y, x) in
        row-major window order without the centre; zero-padded outside the image.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    r = kernel_size // 2
    pad = r * dilation
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    # shifted views instead of F.unfold's im2col (same values, several times faster on a CPU)
    views = [xp[:, :, pad + dy * dilation: pad + dy * dilation + h, pad + dx * dilation: pad + dx * dilation + w]
             for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    return torch.stack(views, dim=2)


def color_similarity(images_lab: torch.Tensor, valid: torch.Tensor, kernel_size: int, dilation: int,
                     sigma_scale: float = 0.5) -> torch.Tensor:
    """Colour similarity of each pixel with its neighbours (BoxInst Eq. 4).

    ``S = exp(-||lab_i − lab_j||₂ · sigma_scale)``; pairs whose neighbour lies outside the valid image
    region (padding, removed bottom rows) get 0.

    Args:
        images_lab: (N, 3, H, W) float LAB images (:func:`rgb_to_lab`).
        valid: (N, H, W) float/bool, 1 on real image pixels, 0 on padding.
        kernel_size, dilation: neighbourhood (``MODEL.BOXINST.PAIRWISE.SIZE`` / ``.DILATION``: 3, 2).
        sigma_scale: θ of ``exp(-||Δlab|| · θ)`` (``MODEL.BOXINST.PAIRWISE.COLOR_SIGMA_SCALE``, 0.5).

    Returns:
        (N, K*K - 1, H, W) float similarities in [0, 1].
    """
    neighbours = unfold_wo_center(images_lab, kernel_size, dilation)
    diff = images_lab[:, :, None] - neighbours
    sim = torch.exp(-torch.norm(diff, dim=1) * sigma_scale)
    valid_n = unfold_wo_center(valid[:, None].float(), kernel_size, dilation)[:, 0]
    return sim * valid_n * valid[:, None].float()


def feature_similarity(features: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Feature similarity of each pixel with its neighbours, ``exp(-||z_i − z_j||₂)`` (SIM official code).

    The official SIM code multiplies BoxInst's colour similarity by this similarity of the momentum
    teacher's L2-normalised mask features, and thresholds the product at 0.1
    (``MODEL.SIM.PAIRWISE.TEACHER_AFFINITY`` / ``MODEL.SIM.PAIRWISE.COLOR_THRESH``).

    Args:
        features: (N, D, H, W) float features (L2-normalised along D).
        kernel_size, dilation: neighbourhood (3, 2), as :func:`color_similarity`.

    Returns:
        (N, K*K - 1, H, W) float similarities in (0, 1]; zero-padded neighbours outside the image.
    """
    neighbours = unfold_wo_center(features, kernel_size, dilation)
    return torch.exp(-torch.norm(features[:, :, None] - neighbours, dim=1))


def prepare_boxinst_targets(images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                            gt_boxes: Sequence[torch.Tensor], stride: int, kernel_size: int, dilation: int,
                            bottom_pixels_removed: int, sigma_scale: float = 0.5) -> dict:
    """Everything the BoxInst losses need, built once per batch before the head (mmdet 3.x style).

    Args:
        images: (N, 3, Hp, Wp) float RGB in [0, 255], padded batch (not normalised).
        image_sizes: N (h, w) sizes of the real image inside the padding, in pixels.
        gt_boxes: N tensors (M_n, 4) float XYXY in padded-image pixels.
        stride: mask output stride (4).
        kernel_size, dilation: pairwise neighbourhood (3, 2).
        bottom_pixels_removed: rows at the bottom of each image excluded from the colour similarity
            (``MODEL.BOXINST.BOTTOM_PIXELS_REMOVED``, AdelaiDet 10).
        sigma_scale: θ of the colour similarity (0.5).

    Returns:
        dict with
            ``box_masks``: list of N tensors (M_n, Hp/stride, Wp/stride) float {0, 1}, each box's pixels
                (:func:`sim_model.boxes.box_masks`) sampled at the mask grid;
            ``color_similarity``: (N, K*K-1, Hp/stride, Wp/stride) float;
            ``images_lab``: (N, 3, Hp/stride, Wp/stride) LAB of the stride-downsampled images;
            ``images_rgb``: (N, 3, Hp/stride, Wp/stride) the stride-downsampled RGB images (average pooling).
    """
    n, _, hp, wp = images.shape
    valid = torch.zeros((n, hp, wp), device=images.device)
    for i, (h, w) in enumerate(image_sizes):
        valid[i, : max(int(h) - bottom_pixels_removed, 0), : int(w)] = 1.0
    start = stride // 2
    down = F.avg_pool2d(images.float(), kernel_size=stride, stride=stride, padding=0)
    valid_s = valid[:, start::stride, start::stride]
    lab = rgb_to_lab(down)
    sim = color_similarity(lab, valid_s, kernel_size, dilation, sigma_scale)
    masks = [box_masks(b, hp, wp, stride).float() for b in gt_boxes]
    return {"box_masks": masks, "color_similarity": sim, "images_lab": lab, "images_rgb": down}


def projection_loss(mask_logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """BoxInst projection loss (Eq. 2): Dice of the x- and y-max-projections, summed, mean over masks.

    Args:
        mask_logits: (P, 1, H, W) float mask logits at the mask-output stride.
        box_mask: (P, 1, H, W) float {0, 1} box masks of each mask's object on the mask grid.

    Returns:
        Scalar loss; ``mask_logits.sum() * 0`` when P = 0.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    return projection_loss_probs(mask_logits.sigmoid(), box_mask)


def projection_loss_probs(probs: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """:func:`projection_loss` on probabilities (also the BSSS teacher's per-class maps, MISA).

    Args:
        probs: (P, 1, H, W) float foreground probabilities; box_mask: (P, 1, H, W) float {0, 1} targets
            (a box, or the union of a class's boxes).

    Returns:
        Scalar: Dice of the y- and x-max-projections, summed, mean over the P maps.
    """
    box_mask = box_mask.to(probs.dtype)
    loss_y = dice_loss(probs.max(dim=2, keepdim=True)[0], box_mask.max(dim=2, keepdim=True)[0])
    loss_x = dice_loss(probs.max(dim=3, keepdim=True)[0], box_mask.max(dim=3, keepdim=True)[0])
    return (loss_x + loss_y).mean()


def pairwise_same_label_nll(mask_logits: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """−log P(pixel and neighbour have the same label) for every pixel pair (BoxInst Eq. 3).

    ``P(same) = p_i p_j + (1 − p_i)(1 − p_j)`` with ``p = σ(logit)``, computed in log space.

    Args:
        mask_logits: (P, 1, H, W) float.
        kernel_size, dilation: neighbourhood (3, 2).

    Returns:
        (P, K*K-1, H, W) float non-negative.
    """
    log_fg = F.logsigmoid(mask_logits)
    log_bg = F.logsigmoid(-mask_logits)
    log_fg_n = unfold_wo_center(log_fg, kernel_size, dilation)
    log_bg_n = unfold_wo_center(log_bg, kernel_size, dilation)
    same_fg = log_fg[:, :, None] + log_fg_n
    same_bg = log_bg[:, :, None] + log_bg_n
    log_same = torch.logaddexp(same_fg, same_bg)
    return -log_same[:, 0]


def pairwise_loss(mask_logits: torch.Tensor, pair_weights: torch.Tensor, kernel_size: int,
                  dilation: int) -> torch.Tensor:
    """BoxInst pairwise loss: weighted mean of :func:`pairwise_same_label_nll`.

    Args:
        mask_logits: (P, 1, H, W) float mask logits.
        pair_weights: (P, K*K-1, H, W) float {0, 1}: 1 for the pairs that should share a label, i.e.
            colour similarity ≥ threshold and pixel inside the object's box (:func:`pairwise_weights`).
        kernel_size, dilation: neighbourhood (3, 2).

    Returns:
        Scalar ``Σ w·nll / max(Σ w, 1)``; ``mask_logits.sum() * 0`` when P = 0.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    nll = pairwise_same_label_nll(mask_logits, kernel_size, dilation)
    return (nll * pair_weights).sum() / pair_weights.sum().clamp(min=1.0)


def pairwise_weights(similarity: torch.Tensor, box_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pairs supervised by the pairwise loss: similarity ≥ threshold, pixel inside the box.

    Args:
        similarity: (P, K*K-1, H, W) affinity of each mask's image (colour similarity, optionally
            times the teacher's feature similarity).
        box_mask: (P, 1, H, W) float {0, 1} box masks.
        threshold: ``MODEL.BOXINST.PAIRWISE.COLOR_THRESH`` (0.3; 0.1 with teacher affinity).

    Returns:
        (P, K*K-1, H, W) float {0, 1}.
    """
    return (similarity >= threshold).float() * box_mask.float()


def pairwise_warmup_factor(iteration: int, warmup_iters: int) -> float:
    """Linear ramp ``min(iteration / warmup_iters, 1)`` of the pairwise loss weight (AdelaiDet)."""
    if warmup_iters <= 0:
        return 1.0
    return min(float(iteration) / float(warmup_iters), 1.0)


def boxinst_losses(mask_logits: torch.Tensor, box_mask: torch.Tensor, affinity: torch.Tensor, threshold: float,
                   iteration: int, settings: BoxInstSettings, with_pairwise: bool = True) -> dict[str, torch.Tensor]:
    """BoxInst's two mask losses for P predicted masks, weighted, the pairwise term ramped in.

    Args:
        mask_logits: (P, 1, H, W) float mask logits on the mask grid.
        box_mask: (P, 1, H, W) float {0, 1} box mask of each mask's object on that grid.
        affinity: (P, K*K-1, H, W) float pair affinity of each mask's image (:func:`color_similarity`,
            optionally times :func:`feature_similarity`).
        threshold: the affinity a pair needs to be supervised (``settings.color_thresh``, or
            ``MODEL.SIM.PAIRWISE.COLOR_THRESH`` with the teacher affinity).
        iteration: training iteration (drives :func:`pairwise_warmup_factor`).
        settings: :class:`sim_model.config.BoxInstSettings`.
        with_pairwise: False leaves the pairwise term out (MISA's SEPA replaces it).

    Returns:
        ``{"loss_prj": projection_weight × projection loss, "loss_pairwise": pairwise_weight × ramp ×
        pairwise loss}`` scalars (only ``loss_prj`` without the pairwise term).
    """
    losses = {"loss_prj": projection_loss(mask_logits, box_mask) * settings.projection_weight}
    if with_pairwise:
        pw = pairwise_weights(affinity, box_mask, threshold)
        ramp = pairwise_warmup_factor(iteration, settings.warmup_iters)
        losses["loss_pairwise"] = (pairwise_loss(mask_logits, pw, settings.kernel_size, settings.dilation)
                                   * settings.pairwise_weight * ramp)
    return losses
