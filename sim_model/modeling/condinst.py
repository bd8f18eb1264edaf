"""The CondInst meta-architecture with BoxInst's box losses and SIM's training step.

``CondInst`` is registered in detectron2's ``META_ARCH_REGISTRY`` and configured by
:func:`sim_model.config.add_sim_config`. In training it returns a dict of ``loss_*`` scalars:

- always: ``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr`` (FCOS), ``loss_prj`` (BoxInst
  projection), ``loss_pairwise`` (BoxInst pairwise, linear warm-up);
- with ``MODEL.SIM.ENABLED``: ``loss_pseudo`` (λ1·L_pseudo, SIM Eq. 8) if
  ``MODEL.SIM.PSEUDO_LOSS.ENABLED`` and ``loss_paste`` (λ2·L_paste, Eq. 9) if
  ``MODEL.SIM.COPY_PASTE.ENABLED``; both are 0 until ``MODEL.SIM.WARMUP_ITERS`` (the gate).

In eval mode it returns detectron2-style ``[{"instances": Instances}]`` with ``pred_boxes``,
``scores``, ``pred_classes`` and ``pred_masks`` (bool, output resolution): a free-running instance
segmenter that never uses the teacher.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from sim_model.losses.boxinst import (
    pairwise_loss,
    pairwise_warmup_factor,
    pairwise_weights,
    prepare_boxinst_targets,
    projection_loss,
    unfold_wo_center,
)

from .fcos import FCOS, HeadOutputs
from .mask_head import DynamicMaskHead, MaskBranch, aligned_bilinear

logger = logging.getLogger(__name__)


@dataclass
class BoxInstSettings:
    """BoxInst loss options (``MODEL.BOXINST.*``)."""

    kernel_size: int = 3
    dilation: int = 2
    color_thresh: float = 0.3
    sigma_scale: float = 0.5
    warmup_iters: int = 10000
    bottom_pixels_removed: int = 10
    projection_weight: float = 1.0
    pairwise_weight: float = 1.0


@dataclass
class SIMSettings:
    """SIM options (``MODEL.SIM.*``, DESIGN.md §2); ``enabled=False`` is plain BoxInst."""

    enabled: bool = False
    warmup_iters: int = 10000
    pseudo_loss: bool = True
    pseudo_weight: float = 0.5
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    copy_paste: bool = True
    paste_weight: float = 1.0
    thresh_low: float = 0.3
    thresh_high: float = 0.7
    alpha: float = 0.5
    mu: float = 5.0
    num_prototypes: int = 10
    temperature: float = 1.0
    prototype_momentum: float = 0.999
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    prototype_input_thresh: float = 0.7
    hard_assignment: bool = True
    teacher: bool = True
    teacher_momentum: float = 0.9999
    bank_size: int = 100
    paste_fraction: float = 0.25
    paste_min: int = 1
    paste_max: int = 3
    min_visible_pixels: int = 1
    max_bank_side: int = 512
    teacher_affinity: bool = False
    affinity_thresh: float = 0.1
    seed: int = 0


@dataclass
class NetOutputs:
    """One pass of :class:`CondInstNet` on a batch.

    Attributes:
        head: FCOS outputs (:class:`~sim_model.modeling.fcos.HeadOutputs`).
        mask_feats: (N, D, H/8, W/8) mask features Z at stride 8 (mask-branch output).
    """

    head: HeadOutputs
    mask_feats: torch.Tensor


class CondInstNet(nn.Module):
    """The trainable network: backbone+FPN, FCOS head with controller, mask branch, dynamic mask head.

    Kept apart from :class:`CondInst` so that the momentum teacher is an EMA copy of exactly this.
    """

    def __init__(self, backbone: nn.Module, fcos: FCOS, mask_branch: MaskBranch, mask_head: DynamicMaskHead,
                 in_features: Sequence[str], mask_in_features: Sequence[str]):
        super().__init__()
        self.backbone = backbone
        self.fcos = fcos
        self.mask_branch = mask_branch
        self.mask_head = mask_head
        self.in_features = list(in_features)
        self.mask_in_features = list(mask_in_features)

    def forward(self, images: torch.Tensor, with_cls: bool = True) -> NetOutputs:
        """images: (N, 3, H, W) normalised, padded to the size divisibility -> :class:`NetOutputs`.

        ``with_cls=False`` skips the classification branch (used by the SIM teacher).
        """
        features = self.backbone(images)
        head = self.fcos([features[f] for f in self.in_features], with_cls=with_cls)
        mask_feats = self.mask_branch([features[f] for f in self.mask_in_features])
        return NetOutputs(head=head, mask_feats=mask_feats)

    def mask_logits(self, out: NetOutputs, im_inds: torch.Tensor, loc_inds: torch.Tensor) -> torch.Tensor:
        """Dynamic-head mask logits of the instances at locations ``loc_inds`` of images ``im_inds``.

        Returns:
            (P, 1, H/4, W/4) mask logits at the mask-output stride.
        """
        head = out.head
        params = head.top_feats[im_inds, loc_inds]
        return self.mask_head(out.mask_feats, params, im_inds, head.locations[loc_inds], head.levels[loc_inds])


@dataclass
class ImageFeatures:
    """Everything computed once per image for the box→mask predictor (see :meth:`CondInst.image_features`).

    Attributes:
        out: the network pass on this one image (batch of 1).
        net: the network that produced it (teacher copy or student).
        mask_features: (D, Hm, Wm) float mask features Z at ``mask_stride`` (bilinear ×2 of the
            stride-8 branch output), NOT L2-normalised (normalise along dim 0 for SIM Eq. 1).
        image_size: (h, w) of the image given to :meth:`CondInst.image_features`, in pixels.
        padded_size: (Hp, Wp) after padding; Hm = Hp / mask_stride.
        mask_stride: 4.
    """

    out: NetOutputs
    net: CondInstNet
    mask_features: torch.Tensor
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    mask_stride: int

    def to_image(self, maps: torch.Tensor, output_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Resample maps on the mask grid to image pixels (CondInst's postprocessing).

        Args:
            maps: (K, Hm, Wm) float maps (probabilities or logits) on the mask grid.
            output_size: (H, W) of the result; default ``image_size``.

        Returns:
            (K, H, W) float: aligned-bilinear ×``mask_stride``, cropped to ``image_size``, then
            bilinear-resized to ``output_size``.
        """
        if maps.shape[0] == 0:
            h, w = output_size or self.image_size
            return maps.new_zeros((0, h, w))
        x = aligned_bilinear(maps[:, None].float(), self.mask_stride)
        h, w = self.image_size
        x = x[:, :, :h, :w]
        if output_size is not None and tuple(output_size) != (h, w):
            x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return x[:, 0]


@META_ARCH_REGISTRY.register()
class CondInst(nn.Module):
    """CondInst trained from boxes with BoxInst's losses and, optionally, SIM (CVPR 2023).

    Submodules: ``net`` (:class:`CondInstNet`, the student), ``teacher``
    (:class:`sim_model.sim.teacher.MomentumTeacher` over ``net``; created at the first SIM training
    step or when a checkpoint containing ``teacher.*`` is loaded; None otherwise), ``prototypes``
    (:class:`sim_model.sim.prototypes.ClassPrototypes`, when SIM is enabled). Buffers: ``iteration``
    (training steps taken, drives the warm-ups; restored by checkpoints). ``memory_bank``
    (:class:`sim_model.sim.copy_paste.MemoryBank`, not a module: register it as a checkpointable).

    Box→mask API (used by ``sim_model.engines.sim.SIMBoxToMask``)::

        feats = model.image_features(image)          # once per image, no grad
        pred_boxes, mask_logits = model.positive_masks(feats, box)   # per box, cheap
        z = feats.mask_features                       # (D, Hm, Wm) for M_S (normalise along dim 0)
        full = feats.to_image(maps, (H0, W0))         # (K, Hm, Wm) -> (K, H0, W0)

    - ``image_features(image: Tensor (3, H, W) uint8 or float, channels in cfg.INPUT.FORMAT, already
      resized by the test transform; use_teacher: bool | None = None) -> ImageFeatures``: one
      backbone/FPN/head/mask-branch pass; uses the teacher copy when one exists (SIM's pseudo masks
      come from the teacher) unless ``use_teacher=False``.
    - ``positive_masks(feats, box: Tensor (4,) XYXY in pixels of that resized image)
      -> (pred_boxes (P, 4) XYXY px, mask_logits (P, Hm, Wm))``: the locations that training would
      make positives of that box (centre sampling, FPN size ranges), their regressed boxes and their
      dynamic-head mask logits at stride ``feats.mask_stride`` (4). P ≥ 1: a box with no positive
      (smaller than a stride) gets the P3 location nearest to its centre.
    """

    @configurable
    def __init__(self, *, net: CondInstNet, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str = "RGB", size_divisibility: int = 32, mask_out_stride: int = 4,
                 topk_proposals_per_im: int = 64, max_proposals: int = -1, num_classes: int = 80,
                 mask_threshold: float = 0.5,
                 boxinst: BoxInstSettings = BoxInstSettings(), sim: SIMSettings = SIMSettings()):
        super().__init__()
        self.net = net
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.mask_out_stride = mask_out_stride
        self.topk_proposals_per_im = topk_proposals_per_im
        self.max_proposals = max_proposals
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.boxinst = boxinst
        self.sim = sim
        self.teacher = None
        self.prototypes = None
        self.memory_bank = None
        self._generator = torch.Generator().manual_seed(sim.seed)
        if sim.enabled:
            from sim_model.sim.copy_paste import MemoryBank
            from sim_model.sim.prototypes import ClassPrototypes

            self.prototypes = ClassPrototypes(num_classes, sim.num_prototypes, net.mask_head.in_channels,
                                              sim.prototype_momentum, seed=sim.seed)
            self.memory_bank = MemoryBank(sim.bank_size, max_side=sim.max_bank_side)
        self._register_load_state_dict_pre_hook(self._build_teacher_before_load)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        c = cfg.MODEL.CONDINST
        f = cfg.MODEL.FCOS
        in_features = list(f.IN_FEATURES)
        soi = list(f.SIZES_OF_INTEREST)
        mask_head = DynamicMaskHead(
            in_channels=c.MASK_BRANCH.OUT_CHANNELS, channels=c.MASK_HEAD.CHANNELS,
            num_layers=c.MASK_HEAD.NUM_LAYERS, sizes_of_interest=soi + [soi[-1] * 2],
            mask_feat_stride=shapes[c.MASK_BRANCH.IN_FEATURES[0]].stride, mask_out_stride=c.MASK_OUT_STRIDE,
            disable_rel_coords=c.MASK_HEAD.DISABLE_REL_COORDS)
        fcos = FCOS(
            in_channels=shapes[in_features[0]].channels, num_classes=f.NUM_CLASSES,
            strides=[shapes[k].stride for k in in_features], num_params=mask_head.num_params,
            sizes_of_interest=soi, center_sample=f.CENTER_SAMPLE, pos_radius=f.POS_RADIUS,
            focal_alpha=f.LOSS_ALPHA, focal_gamma=f.LOSS_GAMMA, pre_nms_thresh_test=f.INFERENCE_TH_TEST,
            pre_nms_topk_test=f.PRE_NMS_TOPK_TEST, post_nms_topk_test=f.POST_NMS_TOPK_TEST, nms_thresh=f.NMS_TH,
            thresh_with_ctr=f.THRESH_WITH_CTR, num_cls_convs=f.NUM_CLS_CONVS, num_box_convs=f.NUM_BOX_CONVS,
            num_share_convs=f.NUM_SHARE_CONVS, norm=f.NORM, prior_prob=f.PRIOR_PROB, use_scale=f.USE_SCALE,
            centerness_on_reg=f.CENTERNESS_ON_REG)
        mask_branch = MaskBranch(
            in_channels=shapes[c.MASK_BRANCH.IN_FEATURES[0]].channels, num_levels=len(c.MASK_BRANCH.IN_FEATURES),
            channels=c.MASK_BRANCH.CHANNELS, num_convs=c.MASK_BRANCH.NUM_CONVS,
            out_channels=c.MASK_BRANCH.OUT_CHANNELS, norm=c.MASK_BRANCH.NORM)
        net = CondInstNet(backbone, fcos, mask_branch, mask_head, in_features, c.MASK_BRANCH.IN_FEATURES)
        b = cfg.MODEL.BOXINST
        s = cfg.MODEL.SIM
        return {
            "net": net,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "size_divisibility": c.SIZE_DIVISIBILITY,
            "mask_out_stride": c.MASK_OUT_STRIDE,
            "topk_proposals_per_im": c.TOPK_PROPOSALS_PER_IM,
            "max_proposals": c.MAX_PROPOSALS,
            "num_classes": f.NUM_CLASSES,
            "mask_threshold": c.INFERENCE_MASK_THRESH,
            "boxinst": BoxInstSettings(
                kernel_size=b.PAIRWISE.SIZE, dilation=b.PAIRWISE.DILATION, color_thresh=b.PAIRWISE.COLOR_THRESH,
                sigma_scale=b.PAIRWISE.COLOR_SIGMA_SCALE, warmup_iters=b.PAIRWISE.WARMUP_ITERS,
                bottom_pixels_removed=b.BOTTOM_PIXELS_REMOVED, projection_weight=b.PROJECTION_WEIGHT,
                pairwise_weight=b.PAIRWISE.WEIGHT),
            "sim": SIMSettings(
                enabled=s.ENABLED, warmup_iters=s.WARMUP_ITERS, pseudo_loss=s.PSEUDO_LOSS.ENABLED,
                pseudo_weight=s.PSEUDO_LOSS.WEIGHT, bce_weight=s.PSEUDO_LOSS.BCE_WEIGHT,
                dice_weight=s.PSEUDO_LOSS.DICE_WEIGHT, copy_paste=s.COPY_PASTE.ENABLED,
                paste_weight=s.COPY_PASTE.WEIGHT, thresh_low=s.THRESH_LOW, thresh_high=s.THRESH_HIGH,
                alpha=s.RECTIFY_ALPHA, mu=s.INSTANCE_MAP_MU, num_prototypes=s.PROTOTYPES.NUM_PER_CLASS,
                temperature=s.PROTOTYPES.TEMPERATURE, prototype_momentum=s.PROTOTYPES.MOMENTUM,
                sinkhorn_epsilon=s.PROTOTYPES.SINKHORN_EPSILON, sinkhorn_iters=s.PROTOTYPES.SINKHORN_ITERS,
                prototype_input_thresh=s.PROTOTYPES.INPUT_THRESH,
                hard_assignment=s.PROTOTYPES.HARD_ASSIGNMENT, teacher=s.TEACHER.ENABLED,
                teacher_momentum=s.TEACHER.MOMENTUM, bank_size=s.COPY_PASTE.BANK_SIZE,
                paste_fraction=s.COPY_PASTE.PASTE_FRACTION, paste_min=s.COPY_PASTE.MIN_PER_IMAGE,
                paste_max=s.COPY_PASTE.MAX_PER_IMAGE, min_visible_pixels=s.COPY_PASTE.MIN_VISIBLE_PIXELS,
                max_bank_side=s.COPY_PASTE.MAX_BANK_SIDE, teacher_affinity=s.PAIRWISE.TEACHER_AFFINITY,
                affinity_thresh=s.PAIRWISE.COLOR_THRESH, seed=max(int(cfg.SEED), 0)),
        }

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def backbone(self) -> nn.Module:
        """The student's backbone (detectron2 convention)."""
        return self.net.backbone

    def _build_teacher_before_load(self, state_dict, prefix, *args):
        """Load pre-hook: a checkpoint holding ``teacher.*`` gets a teacher to load into.

        Teacher tensors whose shape differs from this model's (e.g. a checkpoint trained with another
        number of classes) are dropped with a warning instead of failing the load, like detectron2
        does for the student's tensors.
        """
        keys = [k for k in state_dict if k.startswith(prefix + "teacher.")]
        if not keys:
            return
        if self.teacher is None:
            self._init_teacher()
        own = self.teacher.state_dict(prefix=prefix + "teacher.")
        for k in keys:
            if k in own and tuple(own[k].shape) != tuple(state_dict[k].shape):
                logger.warning("Skip loading %s: shape %s in the checkpoint, %s in the model", k,
                               tuple(state_dict[k].shape), tuple(own[k].shape))
                del state_dict[k]

    def _init_teacher(self):
        from sim_model.sim.teacher import MomentumTeacher

        self.teacher = MomentumTeacher(self.net, self.sim.teacher_momentum).to(self.device)

    def _to_rgb(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) in ``input_format`` -> float RGB [0, 255]."""
        image = image.float()
        return image.flip(0) if self.input_format == "BGR" else image

    def preprocess_image(self, images: Sequence[torch.Tensor]) -> ImageList:
        """Normalise (``MODEL.PIXEL_MEAN/STD``) and pad to ``size_divisibility``."""
        images = [(x.to(self.device).float() - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict]):
        """detectron2 interface: training -> dict of losses; eval -> list of {"instances": Instances}."""
        if not self.training:
            return self.inference(batched_inputs)
        return self._training_step(batched_inputs)

    def _sample_positives(self, head: HeadOutputs, im_inds, loc_inds, gt_inds) -> torch.Tensor:
        """Indices of the positives whose masks are trained (AdelaiDet's TOPK_PROPOSALS_PER_IM)."""
        n = im_inds.numel()
        if self.max_proposals != -1 and n > self.max_proposals:
            return torch.randperm(n, device=im_inds.device)[: self.max_proposals]
        if self.topk_proposals_per_im == -1:
            return torch.arange(n, device=im_inds.device)
        keep = []
        with torch.no_grad():
            quality = head.logits[im_inds, loc_inds].sigmoid().max(dim=1).values * \
                head.ctrness[im_inds, loc_inds].sigmoid()
        for im in im_inds.unique().tolist():
            in_im = torch.nonzero(im_inds == im).squeeze(1)
            gts = gt_inds[in_im].unique()
            per_gt = max(int(self.topk_proposals_per_im / len(gts)), 1)
            for g in gts.tolist():
                idx = in_im[gt_inds[in_im] == g]
                if idx.numel() > per_gt:
                    idx = idx[quality[idx].topk(per_gt).indices]
                keep.append(idx)
        if not keep:
            return torch.zeros(0, dtype=torch.long, device=im_inds.device)
        return torch.cat(keep)

    def _copy_paste(self, raw: list[torch.Tensor], boxes: list[torch.Tensor], classes: list[torch.Tensor]):
        """SIM §3.3: paste bank instances onto each image; returns the new images and annotations."""
        from sim_model.sim.copy_paste import box_masks as cp_box_masks
        from sim_model.sim.copy_paste import copy_paste

        s = self.sim
        out_raw, out_boxes, out_classes, out_pasted, out_masks = [], [], [], [], []
        for img, b, c in zip(raw, boxes, classes):
            h, w = img.shape[1:]
            res = copy_paste(self.memory_bank, img, cp_box_masks(b, h, w), b, s.paste_fraction, s.paste_min,
                             s.paste_max, s.min_visible_pixels, generator=self._generator)
            if res is None:
                out_raw.append(img)
                out_boxes.append(b)
                out_classes.append(c)
                out_pasted.append(torch.zeros(b.shape[0], dtype=torch.bool, device=b.device))
                out_masks.append(torch.zeros((0, h, w), dtype=torch.bool, device=b.device))
                continue
            out_raw.append(res.image)
            out_boxes.append(torch.cat([res.target_boxes, res.pasted_boxes.to(b.device)]))
            out_classes.append(torch.cat([c[res.target_keep], res.pasted_classes.to(c.device)]))
            out_pasted.append(torch.cat([torch.zeros(res.target_boxes.shape[0], dtype=torch.bool),
                                         torch.ones(res.pasted_boxes.shape[0], dtype=torch.bool)]).to(b.device))
            out_masks.append(res.pasted_masks)
        return out_raw, out_boxes, out_classes, out_pasted, out_masks

    def _training_step(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        it = int(self.iteration.item())
        s = self.sim
        sim_on = s.enabled and it >= s.warmup_iters
        if s.enabled and s.teacher:
            if self.teacher is None:
                self._init_teacher()
            elif it > 0:
                self.teacher.update(self.net)  # EMA after the previous optimizer step (SIM §3.4)

        raw = [x["image"].to(self.device) for x in batched_inputs]
        gts = [x["instances"].to(self.device) for x in batched_inputs]
        boxes = [g.gt_boxes.tensor.float() for g in gts]
        classes = [g.gt_classes.long() for g in gts]
        is_pasted = [torch.zeros(b.shape[0], dtype=torch.bool, device=self.device) for b in boxes]
        paste_masks = None
        if sim_on and s.copy_paste and self.memory_bank is not None and len(self.memory_bank) > 0:
            raw, boxes, classes, is_pasted, paste_masks = self._copy_paste(raw, boxes, classes)

        images = self.preprocess_image(raw)
        rgb = ImageList.from_tensors([self._to_rgb(x) for x in raw], self.size_divisibility)
        b = self.boxinst
        prep = prepare_boxinst_targets(rgb.tensor, images.image_sizes, boxes, self.mask_out_stride,
                                       b.kernel_size, b.dilation, b.bottom_pixels_removed, b.sigma_scale)
        bottom_up = getattr(self.net.backbone, "bottom_up", None)
        share_trunk = sim_on and self.teacher is not None and getattr(bottom_up, "num_frozen_blocks", 0) > 0
        if share_trunk:
            bottom_up.record_trunk = True
        try:
            out = self.net(images.tensor)
        finally:
            if share_trunk:
                bottom_up.record_trunk = False
        trunk = bottom_up.last_trunk if share_trunk else None
        if share_trunk:
            bottom_up.last_trunk = None
        fcos = self.net.fcos
        targets = fcos.assign_targets(out.head, boxes, classes)
        losses = fcos.losses(out.head, targets)

        num_loc = out.head.locations.shape[0]
        pos = torch.nonzero(targets.gt_inds >= 0).squeeze(1)
        pos_im, pos_loc, pos_gt = pos // num_loc, pos % num_loc, targets.gt_inds[pos]
        sel = self._sample_positives(out.head, pos_im, pos_loc, pos_gt)
        im_s, loc_s, gt_s = pos_im[sel], pos_loc[sel], pos_gt[sel]
        mask_logits = self.net.mask_logits(out, im_s, loc_s)  # (P, 1, Hm, Wm)
        all_box_masks = torch.cat(prep["box_masks"])  # (M, Hm, Wm)
        box_m = all_box_masks[gt_s][:, None]
        losses["loss_prj"] = projection_loss(mask_logits, box_m) * b.projection_weight

        teacher_out = None
        if sim_on:
            teacher_out = self._teacher_outputs(images.tensor, out, trunk)
        affinity = prep["color_similarity"][im_s]
        thresh = b.color_thresh
        if sim_on and s.teacher_affinity:
            z = F.normalize(aligned_bilinear(teacher_out.mask_feats, 2), dim=1)
            zn = unfold_wo_center(z, b.kernel_size, b.dilation)
            feat_sim = torch.exp(-torch.norm(z[:, :, None] - zn, dim=1))
            affinity = affinity * feat_sim[im_s]
            thresh = s.affinity_thresh
        pw = pairwise_weights(affinity, box_m, thresh)
        ramp = pairwise_warmup_factor(it, b.warmup_iters)
        losses["loss_pairwise"] = pairwise_loss(mask_logits, pw, b.kernel_size, b.dilation) * b.pairwise_weight * ramp

        if s.enabled:
            zero = mask_logits.sum() * 0
            if s.pseudo_loss:
                losses["loss_pseudo"] = zero
            if s.copy_paste:
                losses["loss_paste"] = zero
            if sim_on:
                losses.update(self._sim_losses(raw, images, boxes, classes, is_pasted, paste_masks, all_box_masks,
                                               teacher_out, pos_im, pos_loc, pos_gt, mask_logits, gt_s))
        with torch.no_grad():
            self.iteration += 1
        return losses

    @torch.no_grad()
    def _teacher_outputs(self, images: torch.Tensor, student_out: NetOutputs, trunk=None) -> NetOutputs:
        """Z′ and masks for pseudo labels: the teacher's pass, or the student's (detached) without teacher.

        ``trunk``: the student's frozen-backbone output (EfficientNet-Lite with ``FREEZE_AT`` > 0). The
        frozen stages are never trained, so the teacher's EMA copy of them equals the student's and
        the teacher starts its pass after them.
        """
        if self.teacher is not None:
            t_bu = getattr(self.teacher.model.backbone, "bottom_up", None)
            if trunk is not None and t_bu is not None:
                t_bu.trunk_input = trunk
            try:
                return self.teacher.model(images, with_cls=False)
            finally:
                if t_bu is not None:
                    t_bu.trunk_input = None
        h = student_out.head
        return NetOutputs(
            head=HeadOutputs(h.logits.detach(), h.bbox_reg.detach(), h.ctrness.detach(), h.top_feats.detach(),
                             h.locations, h.levels, h.strides),
            mask_feats=student_out.mask_feats.detach())

    def _teacher_net(self) -> CondInstNet:
        return self.teacher.model if self.teacher is not None else self.net

    def _sim_losses(self, raw, images: ImageList, boxes, classes, is_pasted, paste_masks, all_box_masks,
                    t_out: NetOutputs, pos_im, pos_loc, pos_gt, mask_logits, gt_s) -> dict[str, torch.Tensor]:
        """SIM's pseudo-mask loss (Eq. 6–8), paste loss (Eq. 9), prototype update (Eq. 2–5), bank push."""
        from sim_model.sim.pseudo_masks import (
            instance_map,
            mask_score,
            positive_weights,
            pseudo_mask_loss,
            rectify,
            threshold_pseudo_mask,
        )

        s = self.sim
        stride = self.mask_out_stride
        hm, wm = all_box_masks.shape[-2:]
        gt_boxes = torch.cat(boxes)
        gt_classes = torch.cat(classes)
        gt_pasted = torch.cat(is_pasted)
        gt_image = torch.cat([torch.full((bx.shape[0],), i, dtype=torch.long, device=self.device)
                              for i, bx in enumerate(boxes)])
        num_gt = gt_boxes.shape[0]
        losses = {}
        # pixels covered by pasted instances, per image, on the mask grid
        covered = torch.zeros((len(boxes), hm, wm), dtype=torch.bool, device=self.device)
        paste_grid = torch.zeros((num_gt, hm, wm), device=self.device)
        if paste_masks is not None:
            start = stride // 2
            offset = 0
            for i, pm in enumerate(paste_masks):
                n_real = int((~is_pasted[i]).sum())
                if pm.shape[0]:
                    full = torch.zeros((pm.shape[0], hm * stride, wm * stride), dtype=torch.bool, device=self.device)
                    full[:, : pm.shape[1], : pm.shape[2]] = pm.to(self.device)
                    grid = full[:, start::stride, start::stride]
                    covered[i] = grid.any(dim=0)
                    paste_grid[offset + n_real: offset + n_real + pm.shape[0]] = grid.float()
                offset += boxes[i].shape[0]

        with torch.no_grad():
            t_net = self._teacher_net()
            real = torch.nonzero(~gt_pasted).squeeze(1)
            t_logits = t_net.mask_logits(t_out, pos_im, pos_loc)[:, 0]  # (Pall, Hm, Wm)
            t_probs = t_logits.sigmoid()
            t_boxes = t_out.head.boxes()[pos_im, pos_loc]
            m_i = torch.zeros((num_gt, hm, wm), device=self.device)
            for g in real.tolist():
                sel = pos_gt == g
                if bool(sel.any()):
                    w = positive_weights(t_boxes[sel], gt_boxes[g], s.mu)
                    m_i[g] = instance_map(t_probs[sel], w)
            z = F.normalize(aligned_bilinear(t_out.mask_feats, 2), dim=1)  # (N, D, Hm, Wm) Z′
            m_s, valid = self.prototypes.semantic_map(z[gt_image[real]], gt_classes[real], s.temperature)
            region = all_box_masks[real] * (~covered[gt_image[real]]).float()
            m_prob = rectify(m_s, m_i[real], s.alpha, valid) * region
            target_r, weight_r = threshold_pseudo_mask(m_prob, s.thresh_low, s.thresh_high)
            scores_r = mask_score(m_prob, target_r)
            target = torch.zeros((num_gt, hm, wm), device=self.device)
            weight = torch.ones((num_gt, hm, wm), device=self.device)
            target[real], weight[real] = target_r, weight_r

        student_pasted = gt_pasted[gt_s]
        if s.pseudo_loss:
            k = ~student_pasted
            losses["loss_pseudo"] = pseudo_mask_loss(mask_logits[k, 0], target[gt_s[k]], weight[gt_s[k]],
                                                     s.bce_weight, s.dice_weight) * s.pseudo_weight
        if s.copy_paste:
            k = student_pasted
            t = paste_grid[gt_s[k]]
            losses["loss_paste"] = pseudo_mask_loss(mask_logits[k, 0], t, torch.ones_like(t), s.bce_weight,
                                                    s.dice_weight) * s.paste_weight

        with torch.no_grad():
            # prototypes (Eq. 2–5): teacher features of in-box pixels whose teacher mask prob > threshold
            feed = (m_i[real] > s.prototype_input_thresh) & (region > 0)
            img_r, cls_r = gt_image[real], gt_classes[real]
            for im in img_r.unique().tolist():
                for c in cls_r[img_r == im].unique().tolist():
                    k = (img_r == im) & (cls_r == c)
                    pix = feed[k].any(dim=0)
                    if bool(pix.any()):
                        self.prototypes.update(z[im][:, pix].t(), c, s.sinkhorn_epsilon, s.sinkhorn_iters,
                                               hard_assignment=s.hard_assignment)
            # memory bank (§3.3): this step's images with the real objects' pseudo masks and S_k
            if s.copy_paste and self.memory_bank is not None:
                for im in range(len(raw)):
                    k = img_r == im
                    if not bool(k.any()):
                        continue
                    h, w = raw[im].shape[1:]
                    probs = aligned_bilinear(m_prob[k][:, None], stride)[:, 0, :h, :w]
                    masks = probs >= s.thresh_high
                    self.memory_bank.push(raw[im], masks, cls_r[k], scores_r[k])
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True) -> list[dict]:
        """Free-running instance segmentation (student only).

        Returns:
            one ``{"instances": Instances}`` per input at the requested output size (``height``/``width``
            of the input dict, default the input image size) with ``pred_boxes`` (Boxes, XYXY px),
            ``scores`` (K,), ``pred_classes`` (K,), ``pred_masks`` (K, H, W) bool.
        """
        images = self.preprocess_image([x["image"] for x in batched_inputs])
        out = self.net(images.tensor)
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            det = self.net.fcos.detect_single(out.head, i, (h, w))
            loc = det["loc_index"]
            logits = self.net.mask_logits(out, torch.full_like(loc, i), loc)[:, 0]
            oh, ow = (x.get("height", h), x.get("width", w)) if do_postprocess else (h, w)
            feats = ImageFeatures(out=out, net=self.net, mask_features=out.mask_feats[i], image_size=(h, w),
                                  padded_size=tuple(images.tensor.shape[-2:]), mask_stride=self.mask_out_stride)
            probs = feats.to_image(logits.sigmoid(), (oh, ow))
            inst = Instances((oh, ow))
            bx = det["boxes"].clone()
            bx[:, 0::2] *= ow / w
            bx[:, 1::2] *= oh / h
            inst.pred_boxes = Boxes(bx)
            inst.scores = det["scores"]
            inst.pred_classes = det["classes"]
            inst.pred_masks = probs >= self.mask_threshold
            results.append({"instances": inst})
        return results

    # ------------------------------------------------------------------ box -> mask API
    @torch.no_grad()
    def image_features(self, image: torch.Tensor, use_teacher: Optional[bool] = None) -> ImageFeatures:
        """One network pass on one image for the box→mask predictor (see the class docstring).

        Args:
            image: (3, H, W) uint8 or float, channel order ``cfg.INPUT.FORMAT``, already resized.
            use_teacher: None = teacher copy when present, else the student.

        Raises:
            ValueError: image not (3, H, W).
        """
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        net = self.teacher.model if (self.teacher is not None and use_teacher is not False) else self.net
        was_training = net.training
        net.eval()
        try:
            images = self.preprocess_image([image])
            out = net(images.tensor)
        finally:
            net.train(was_training)
            if self.teacher is not None:
                self.teacher.model.eval()
        z = aligned_bilinear(out.mask_feats, net.mask_head.mask_feat_stride // self.mask_out_stride)[0]
        return ImageFeatures(out=out, net=net, mask_features=z, image_size=tuple(images.image_sizes[0]),
                             padded_size=tuple(images.tensor.shape[-2:]), mask_stride=self.mask_out_stride)

    @torch.no_grad()
    def positive_masks(self, feats: ImageFeatures, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive locations of a box, their regressed boxes and mask logits (for M_I, SIM Eq. 6).

        Args:
            feats: from :meth:`image_features`.
            box: (4,) float XYXY in pixels of the image given to :meth:`image_features`.

        Returns:
            pred_boxes: (P, 4) float XYXY px; mask_logits: (P, Hm, Wm) float at ``feats.mask_stride``.
        """
        box = torch.as_tensor(box, dtype=torch.float32, device=self.device).reshape(4)
        head = feats.out.head
        fcos = feats.net.fcos
        _, _, idx = fcos.assign_targets_single(head.locations, head.levels, head.strides, box[None],
                                               torch.zeros(1, dtype=torch.long, device=self.device))
        loc = torch.nonzero(idx >= 0).squeeze(1)
        if loc.numel() == 0:
            p3 = torch.nonzero(head.levels == 0).squeeze(1)
            centre = (box[:2] + box[2:]) / 2
            d = (head.locations[p3] - centre[None]).abs().sum(dim=1)
            loc = p3[d.argmin()].reshape(1)
        im = torch.zeros_like(loc)
        logits = feats.net.mask_logits(feats.out, im, loc)[:, 0]
        return head.boxes()[0][loc], logits
