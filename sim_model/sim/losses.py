"""SIM's part of a training step after the warm-up gate (§3.2–3.4): the pseudo-mask loss (Eq. 8), the
copy-paste loss (Eq. 9), the prototype update (Eq. 2–5) and the memory-bank push.

:func:`sim_losses` is called by :class:`sim_model.condinst.CondInst` once per step with the batch after
copy-paste, the student's trained masks and the teacher's pass; it returns the weighted losses
``loss_pseudo`` (λ1·L_pseudo) and ``loss_paste`` (λ2·L_paste) and updates the prototypes and the bank
in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from sim_model.config import SIMSettings
from sim_model.modeling.fcos import Positives
from sim_model.modeling.mask_head import aligned_bilinear
from sim_model.modeling.network import CondInstNet, NetOutputs
from sim_model.sim.copy_paste import MemoryBank, paste_masks_on_grid
from sim_model.sim.prototypes import ClassPrototypes
from sim_model.sim.pseudo_masks import pseudo_mask_loss, sim_pseudo_masks


@dataclass
class SIMBatch:
    """The batch as SIM's losses see it (lists: one entry per image).

    Attributes:
        images: (3, H_i, W_i) un-normalised images after copy-paste (pushed into the memory bank).
        boxes: (M_i, 4) float XYXY px objects; classes: (M_i,) long; is_pasted: (M_i,) bool.
        paste_masks: (K_i, H_i, W_i) bool masks of the pasted objects (the last K_i of each image).
        box_grid_masks: (Σ M_i, Hm, Wm) float {0, 1} every object's box on the mask grid.
        box_tight: (M_i,) bool, False for objects whose box the view cut (``gt_box_tight``,
            :mod:`training.data`): their pseudo masks are not pushed into the memory bank.
        supervised: (Σ M_i,) bool, the objects whose annotator's mask supervises them alone
            (``MODEL.MASK_SUPERVISION.EXCLUSIVE``), or None: no pseudo loss on them, and their mask instead
            of their pseudo mask feeds the prototypes and (score 1) the memory bank.
        mask_grid: (Σ M_i, Hm, Wm) float {0, 1} those masks on the mask grid (None with ``supervised``).
        gt_masks: per image (M_i, H_i, W_i) bool those masks at image resolution, or None for an image
            without any (None with ``supervised``).
    """

    images: Sequence[torch.Tensor]
    boxes: Sequence[torch.Tensor]
    classes: Sequence[torch.Tensor]
    is_pasted: Sequence[torch.Tensor]
    paste_masks: Sequence[torch.Tensor]
    box_grid_masks: torch.Tensor
    box_tight: Sequence[torch.Tensor]
    supervised: torch.Tensor | None = None
    mask_grid: torch.Tensor | None = None
    gt_masks: Sequence[torch.Tensor | None] | None = None


def sim_losses(settings: SIMSettings, batch: SIMBatch, positives: Positives, trained: Positives,
               mask_logits: torch.Tensor, teacher: CondInstNet, teacher_out: NetOutputs, stride: int,
               prototypes: ClassPrototypes, memory_bank: MemoryBank | None) -> dict[str, torch.Tensor]:
    """SIM's losses and state updates for one step (module docstring).

    Pseudo labels (Eq. 6 → 1 → 7 → 8 → 11, :func:`sim_pseudo_masks`) come from the teacher's masks of all
    positives of each real (not pasted) object, the teacher's mask features Z′ and the prototypes,
    restricted to the object's box minus the pixels that pastes cover. The pseudo loss trains the
    student's masks of real objects on them (BCE + Dice with the ignore mask, Eq. 8); the paste loss
    trains the masks of pasted objects on their pasted masks (Eq. 9). The prototypes of each class of
    each image are fed the teacher features of in-box pixels whose M_I exceeds
    ``prototype_input_thresh`` (official code); the bank receives each image with its real objects'
    pseudo masks (M̂_prob ≥ τ_high, at image resolution) and S_k, except objects whose box the view cut.
    An object that an annotator's mask supervises alone (``batch.supervised``) gets no pseudo loss, and its
    mask stands in for its pseudo mask in the prototypes' input and in the bank (score 1).

    Args:
        settings: :class:`sim_model.config.SIMSettings`.
        batch: :class:`SIMBatch`.
        positives: every positive location of the batch.
        trained: the positives whose student masks are trained (a subset, CondInst's top-k sampling).
        mask_logits: (P_trained, 1, Hm, Wm) float student mask logits of ``trained``.
        teacher: the network that produced ``teacher_out`` (teacher copy, or the student).
        teacher_out: the teacher's pass on the batch.
        stride: the mask-output stride (4).
        prototypes: updated in place.
        memory_bank: pushed to in place (None: copy-paste off).

    Returns:
        ``{"loss_pseudo"}`` and/or ``{"loss_paste"}`` per ``settings.pseudo_loss`` / ``settings.copy_paste``.
    """
    s = settings
    device = mask_logits.device
    grid_hw = tuple(batch.box_grid_masks.shape[-2:])
    gt_boxes = torch.cat(list(batch.boxes))
    gt_classes = torch.cat(list(batch.classes))
    gt_pasted = torch.cat(list(batch.is_pasted))
    gt_image = torch.cat([torch.full((b.shape[0],), i, dtype=torch.long, device=device)
                          for i, b in enumerate(batch.boxes)])
    covered, paste_grid = paste_masks_on_grid(batch.paste_masks, batch.is_pasted, grid_hw, stride)
    real = torch.nonzero(~gt_pasted).squeeze(1)
    tight_r = torch.cat(list(batch.box_tight))[real]
    img_r, cls_r = gt_image[real], gt_classes[real]
    region = batch.box_grid_masks[real] * (~covered[img_r]).float()
    with torch.no_grad():
        t_probs = teacher.mask_logits(teacher_out, positives.image, positives.location)[:, 0].sigmoid()
        t_boxes = teacher_out.head.boxes()[positives.image, positives.location]
        object_of = torch.full((gt_boxes.shape[0],), -1, dtype=torch.long, device=device)
        object_of[real] = torch.arange(real.numel(), device=device)
        z = F.normalize(aligned_bilinear(teacher_out.mask_feats, 2), dim=1)  # (N, D, Hm, Wm) Z′
        pm = sim_pseudo_masks(t_probs, t_boxes, object_of[positives.object], gt_boxes[real], z[img_r], cls_r,
                              prototypes, mu=s.mu, alpha=s.alpha, tau=s.temperature, tau_low=s.thresh_low,
                              tau_high=s.thresh_high, region=region)
        hm, wm = grid_hw
        target = torch.zeros((gt_boxes.shape[0], hm, wm), device=device)
        weight = torch.ones((gt_boxes.shape[0], hm, wm), device=device)
        target[real], weight[real] = pm.target, pm.weight

    sup = batch.supervised if batch.supervised is not None else torch.zeros_like(gt_pasted)
    sup_r = sup[real]
    losses = {}
    student_pasted = gt_pasted[trained.object]
    if s.pseudo_loss:
        k = ~student_pasted & ~sup[trained.object]  # a supervised object learns from its mask (loss_mask)
        obj = trained.object[k]
        losses["loss_pseudo"] = pseudo_mask_loss(mask_logits[k, 0], target[obj], weight[obj], s.bce_weight,
                                                 s.dice_weight) * s.pseudo_weight
    if s.copy_paste:
        k = student_pasted
        t = paste_grid[trained.object[k]]
        losses["loss_paste"] = pseudo_mask_loss(mask_logits[k, 0], t, torch.ones_like(t), s.bce_weight,
                                                s.dice_weight) * s.paste_weight

    with torch.no_grad():
        feed = (pm.instance_map > s.prototype_input_thresh) & (region > 0)
        if bool(sup_r.any()):
            feed[sup_r] = (batch.mask_grid[real][sup_r] > 0.5) & (region[sup_r] > 0)
        for im in img_r.unique().tolist():
            for c in cls_r[img_r == im].unique().tolist():
                k = (img_r == im) & (cls_r == c)
                pix = feed[k].any(dim=0)
                if bool(pix.any()):
                    prototypes.update(z[im][:, pix].t(), c, s.sinkhorn_epsilon, s.sinkhorn_iters,
                                      hard_assignment=s.hard_assignment)
        if s.copy_paste and memory_bank is not None:
            for im, image in enumerate(batch.images):
                k = (img_r == im) & tight_r
                if not bool(k.any()):
                    continue
                h, w = image.shape[1:]
                masks = aligned_bilinear(pm.prob[k][:, None], stride)[:, 0, :h, :w] >= s.thresh_high
                scores = pm.score[k]
                sup_k = sup_r[k]
                if bool(sup_k.any()):  # the annotator's mask (the real objects come first in each image)
                    own = batch.gt_masks[im][: int((img_r == im).sum())][k[img_r == im]]
                    masks = torch.where(sup_k[:, None, None], own.to(masks.device), masks)
                    scores = torch.where(sup_k, torch.ones_like(scores), scores)
                memory_bank.push(image, masks, cls_r[k], scores)
    return losses


__all__ = ["SIMBatch", "sim_losses"]
