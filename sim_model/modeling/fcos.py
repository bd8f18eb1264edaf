"""FCOS detector head of CondInst (Tian et al., ICCV 2019; AdelaiDet's implementation).

Locations of all FPN levels are concatenated into one axis: every per-image tensor below has one row
per location, ordered level by level, row-major inside a level. ``FCOS`` holds the head (towers,
classification, box regression, centerness, and the CondInst controller that predicts the dynamic
mask-head parameters), the target assignment with centre sampling, the losses and the inference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms, get_norm
from detectron2.utils.comm import get_world_size
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import nn

INF = 1e8


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over DDP workers (no-op on one process)."""
    n = get_world_size()
    if n < 2:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x / n


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level for the box regression)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value], dtype=torch.float32))

    def forward(self, x):
        """``x`` times the learned scalar.

        Args:
            x: a float tensor of any shape; in FCOS one level's box regression, (N, 4, H_l, W_l).

        Returns:
            ``x * scale``: the same shape (the (1,) float32 parameter broadcasts), the promoted dtype of
            ``x`` and float32 (float32 for float32 or half inputs, float64 for float64).
        """
        return x * self.scale


@dataclass
class HeadOutputs:
    """Raw FCOS head outputs for a batch of N images over the L locations of all levels.

    Attributes:
        logits: (N, L, C) classification logits.
        bbox_reg: (N, L, 4) distances (left, top, right, bottom) in units of the level's stride, ≥ 0.
        ctrness: (N, L) centerness logits.
        top_feats: (N, L, G) controller outputs = dynamic mask-head parameters (G = number of params).
        locations: (L, 2) float (x, y) pixel coordinates of the locations in the padded input.
        levels: (L,) long FPN level index (0 = P3).
        strides: (L,) float stride in pixels of each location's level.
    """

    logits: torch.Tensor
    bbox_reg: torch.Tensor
    ctrness: torch.Tensor
    top_feats: torch.Tensor
    locations: torch.Tensor
    levels: torch.Tensor
    strides: torch.Tensor

    def boxes(self) -> torch.Tensor:
        """(N, L, 4) predicted boxes XYXY in pixels of the padded input."""
        return decode_boxes(self.bbox_reg, self.locations, self.strides)


def decode_boxes(bbox_reg: torch.Tensor, locations: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """FCOS box decoding: (..., L, 4) distances (left, top, right, bottom) in stride units at (L, 2) (x, y)
    pixel locations with (L,) strides → (..., L, 4) float boxes XYXY in pixels."""
    d = bbox_reg * strides[:, None]
    return torch.cat([locations - d[..., :2], locations + d[..., 2:]], dim=-1)


@dataclass
class Positives:
    """Positive locations of a batch, one entry each.

    Attributes:
        image: (P,) long image index in the batch.
        location: (P,) long location index (rows of :class:`HeadOutputs`).
        object: (P,) long index of the assigned object in the concatenation of all images' objects.
    """

    image: torch.Tensor
    location: torch.Tensor
    object: torch.Tensor

    def select(self, idx: torch.Tensor) -> "Positives":
        """The positives at ``idx`` (long indices or a bool mask)."""
        return Positives(self.image[idx], self.location[idx], self.object[idx])


@dataclass
class FCOSTargets:
    """Per-location training targets for a batch (flattened as image-major ``n * L + l``).

    Attributes:
        labels: (N*L,) long class id, ``num_classes`` for background.
        reg_targets: (N*L, 4) float (l, t, r, b) distances divided by the level's stride.
        gt_inds: (N*L,) long index of the assigned object in the concatenation of all images'
            ground truth, -1 for background.
    """

    labels: torch.Tensor
    reg_targets: torch.Tensor
    gt_inds: torch.Tensor

    def positives(self, num_locations: int) -> Positives:
        """The positive locations (``gt_inds >= 0``) as :class:`Positives`; ``num_locations`` = L per image."""
        pos = torch.nonzero(self.gt_inds >= 0).squeeze(1)
        return Positives(pos // num_locations, pos % num_locations, self.gt_inds[pos])


def compute_locations(h: int, w: int, stride: int, device) -> torch.Tensor:
    """(h*w, 2) pixel coordinates (x, y) of a level's locations: ``stride // 2 + stride * index``."""
    xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1) + stride // 2


class FCOSHead(nn.Module):
    """Towers + classification / regression / centerness / controller convolutions.

    Args:
        in_channels: FPN channels.
        num_classes: C.
        num_levels: number of FPN levels (one ``Scale`` each).
        num_params: channels of the controller output (dynamic mask-head parameters); 0 = none.
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int, num_params: int, *,
                 num_cls_convs: int = 4, num_box_convs: int = 4, num_share_convs: int = 0, norm: str = "GN",
                 prior_prob: float = 0.01, use_scale: bool = True, centerness_on_reg: bool = True):
        super().__init__()
        self.centerness_on_reg = centerness_on_reg

        def tower(n):
            layers = []
            for _ in range(n):
                layers.append(nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=norm in ("", "none")))
                if norm not in ("", "none"):
                    layers.append(get_norm(norm, in_channels) if norm != "GN" else nn.GroupNorm(32, in_channels))
                layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.share_tower = tower(num_share_convs)
        self.cls_tower = tower(num_cls_convs)
        self.bbox_tower = tower(num_box_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.controller = nn.Conv2d(in_channels, num_params, 3, padding=1) if num_params > 0 else None
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)]) if use_scale else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[torch.Tensor], with_cls: bool = True):
        """features: per level (N, Cin, H_l, W_l) -> per-level lists (logits, bbox_reg, ctrness, top_feats).

        ``with_cls=False`` skips the classification tower (logits are then (N, 0, H_l, W_l)); the SIM
        teacher only needs boxes, centerness and controller outputs.
        """
        logits, bbox_reg, ctrness, top_feats = [], [], [], []
        for lvl, feature in enumerate(features):
            lg, reg, ctr, top = self.forward_level(feature, lvl, with_cls=with_cls)
            logits.append(lg)
            bbox_reg.append(reg)
            ctrness.append(ctr)
            if top is not None:
                top_feats.append(top)
        return logits, bbox_reg, ctrness, top_feats

    def forward_level(self, feature: torch.Tensor, level: int, with_cls: bool = True):
        """The head on one FPN level (the convolutions share their weights across levels, only the
        regression ``Scale`` is per level).

        Args:
            feature: (N, Cin, H, W) float FPN features of level ``level`` (0 = P3).
            with_cls: False skips the classification tower (see :meth:`forward`).

        Returns:
            (logits (N, C or 0, H, W), bbox_reg (N, 4, H, W) ≥ 0 in stride units, ctrness (N, 1, H, W),
            top_feats (N, num_params, H, W) or None without a controller).
        """
        feature = self.share_tower(feature)
        box_t = self.bbox_tower(feature)
        if with_cls or not self.centerness_on_reg:
            cls_t = self.cls_tower(feature)
            logits = self.cls_logits(cls_t)
        else:
            logits = feature.new_zeros((feature.shape[0], 0) + tuple(feature.shape[2:]))
        ctrness = self.ctrness(box_t if self.centerness_on_reg else cls_t)
        reg = self.bbox_pred(box_t)
        if self.scales is not None:
            reg = self.scales[level](reg)
        reg = F.relu(reg)  # improved FCOS: ReLU on normalised distances
        top = self.controller(box_t) if self.controller is not None else None
        return logits, reg, ctrness, top


class FCOS(nn.Module):
    """FCOS with centre sampling: head, target assignment, losses, inference (AdelaiDet's ``FCOS``)."""

    def __init__(self, *, in_channels: int, num_classes: int, strides: Sequence[int], num_params: int,
                 sizes_of_interest: Sequence[float], center_sample: bool = True, pos_radius: float = 1.5,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, pre_nms_thresh_test: float = 0.05,
                 pre_nms_topk_test: int = 1000, post_nms_topk_test: int = 100, nms_thresh: float = 0.6,
                 thresh_with_ctr: bool = False, **head_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.strides = list(strides)
        self.head = FCOSHead(in_channels, num_classes, len(strides), num_params, **head_kwargs)
        soi = [-1.0] + [float(s) for s in sizes_of_interest] + [INF]
        self.sizes_of_interest = [(soi[i], soi[i + 1]) for i in range(len(strides))]
        self.center_sample = center_sample
        self.pos_radius = pos_radius
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.pre_nms_thresh_test = pre_nms_thresh_test
        self.pre_nms_topk_test = pre_nms_topk_test
        self.post_nms_topk_test = post_nms_topk_test
        self.nms_thresh = nms_thresh
        self.thresh_with_ctr = thresh_with_ctr

    # ------------------------------------------------------------------ forward
    def forward(self, features: Sequence[torch.Tensor], with_cls: bool = True) -> HeadOutputs:
        """features: per level (N, C, H_l, W_l), strides ``self.strides`` -> :class:`HeadOutputs`.

        ``with_cls=False``: no classification branch (``logits`` has 0 classes), see :class:`FCOSHead`.
        """
        logits, bbox_reg, ctrness, top_feats = self.head(features, with_cls=with_cls)
        locations, levels, strides = self.locations(features)

        def flat(xs):
            return torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2] * x.shape[3], x.shape[1])
                              for x in xs], dim=1)

        n = features[0].shape[0]
        return HeadOutputs(
            logits=flat(logits), bbox_reg=flat(bbox_reg), ctrness=flat(ctrness)[..., 0],
            top_feats=flat(top_feats) if top_feats else features[0].new_zeros((n, 0, 0)),
            locations=locations, levels=levels, strides=strides)

    def locations(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The locations of all levels in :class:`HeadOutputs`' order (level-major, then row-major).

        Args:
            features: per level (N, C, H_l, W_l) (only their sizes and device are used).

        Returns:
            locations (L, 2) float (x, y) px, levels (L,) long (0 = P3), strides (L,) float px.
        """
        device = features[0].device
        locs, levels, strides = [], [], []
        for lvl, f in enumerate(features):
            h, w = f.shape[-2:]
            loc = compute_locations(h, w, self.strides[lvl], device)
            locs.append(loc)
            levels.append(torch.full((loc.shape[0],), lvl, dtype=torch.long, device=device))
            strides.append(torch.full((loc.shape[0],), float(self.strides[lvl]), device=device))
        return torch.cat(locs), torch.cat(levels), torch.cat(strides)

    # ------------------------------------------------------------------ targets
    def assign_targets_single(self, locations: torch.Tensor, levels: torch.Tensor, strides: torch.Tensor,
                              boxes: torch.Tensor, classes: torch.Tensor):
        """FCOS target assignment for one image.

        A location is a positive of a box when it lies inside the box's centre region (radius
        ``pos_radius`` × stride around the box centre, clipped to the box) if centre sampling is on,
        else inside the box, and the box's largest regression distance falls in the level's size
        range; a location claimed by several boxes goes to the smallest-area box.

        Args:
            locations: (L, 2) (x, y) px; levels: (L,) long; strides: (L,) float.
            boxes: (M, 4) XYXY px; classes: (M,) long.

        Returns:
            labels (L,) long (``num_classes`` = background), reg_targets (L, 4) in stride units,
            box_index (L,) long index into ``boxes`` (-1 = background).
        """
        num_loc = locations.shape[0]
        device = locations.device
        if boxes.numel() == 0:
            return (torch.full((num_loc,), self.num_classes, dtype=torch.long, device=device),
                    locations.new_zeros((num_loc, 4)), torch.full((num_loc,), -1, dtype=torch.long, device=device))
        xs, ys = locations[:, 0], locations[:, 1]
        boxes = boxes.to(locations.dtype)
        l = xs[:, None] - boxes[None, :, 0]
        t = ys[:, None] - boxes[None, :, 1]
        r = boxes[None, :, 2] - xs[:, None]
        b = boxes[None, :, 3] - ys[:, None]
        reg = torch.stack([l, t, r, b], dim=2)  # (L, M, 4)
        if self.center_sample:
            cx = (boxes[:, 0] + boxes[:, 2]) / 2
            cy = (boxes[:, 1] + boxes[:, 3]) / 2
            rad = strides[:, None] * self.pos_radius
            x0 = torch.maximum(cx[None] - rad, boxes[None, :, 0])
            y0 = torch.maximum(cy[None] - rad, boxes[None, :, 1])
            x1 = torch.minimum(cx[None] + rad, boxes[None, :, 2])
            y1 = torch.minimum(cy[None] + rad, boxes[None, :, 3])
            c_reg = torch.stack([xs[:, None] - x0, ys[:, None] - y0, x1 - xs[:, None], y1 - ys[:, None]], dim=2)
            in_box = c_reg.min(dim=2).values > 0
        else:
            in_box = reg.min(dim=2).values > 0
        max_reg = reg.max(dim=2).values
        soi = torch.tensor(self.sizes_of_interest, device=device, dtype=locations.dtype)[levels]  # (L, 2)
        cared = (max_reg >= soi[:, :1]) & (max_reg <= soi[:, 1:])
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        loc_area = area[None].expand(num_loc, -1).clone()
        loc_area[~in_box] = INF
        loc_area[~cared] = INF
        min_area, idx = loc_area.min(dim=1)
        reg_t = reg[torch.arange(num_loc, device=device), idx] / strides[:, None]
        labels = classes[idx].clone()
        bg = min_area == INF
        labels[bg] = self.num_classes
        idx = idx.clone()
        idx[bg] = -1
        return labels, reg_t, idx

    def assign_targets(self, head: HeadOutputs, gt_boxes: Sequence[torch.Tensor],
                       gt_classes: Sequence[torch.Tensor]) -> FCOSTargets:
        """Targets for all images; ``gt_inds`` index the concatenation of all images' boxes."""
        labels, regs, inds = [], [], []
        offset = 0
        for boxes, classes in zip(gt_boxes, gt_classes):
            lab, reg, idx = self.assign_targets_single(head.locations, head.levels, head.strides, boxes, classes)
            labels.append(lab)
            regs.append(reg)
            inds.append(torch.where(idx >= 0, idx + offset, idx))
            offset += boxes.shape[0]
        return FCOSTargets(labels=torch.cat(labels), reg_targets=torch.cat(regs), gt_inds=torch.cat(inds))

    # ------------------------------------------------------------------ losses
    @staticmethod
    def centerness_targets(reg_targets: torch.Tensor) -> torch.Tensor:
        """(P, 4) (l, t, r, b) -> (P,) sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))."""
        if reg_targets.numel() == 0:
            return reg_targets.new_zeros(0)
        lr = reg_targets[:, [0, 2]]
        tb = reg_targets[:, [1, 3]]
        c = (lr.min(dim=-1).values / lr.max(dim=-1).values.clamp_min(1e-6)) * \
            (tb.min(dim=-1).values / tb.max(dim=-1).values.clamp_min(1e-6))
        return torch.sqrt(c.clamp_min(0))

    def losses(self, head: HeadOutputs, targets: FCOSTargets) -> dict[str, torch.Tensor]:
        """Focal classification, GIoU box (weighted by centerness targets) and centerness BCE losses.

        Returns:
            ``{"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}`` scalars.
        """
        c = self.num_classes
        logits = head.logits.reshape(-1, c)
        labels = targets.labels
        pos = torch.nonzero(labels != c).squeeze(1)
        num_pos = max(reduce_mean(pos.new_tensor([pos.numel()], dtype=torch.float32)).item(), 1.0)
        cls_t = torch.zeros_like(logits)
        cls_t[pos, labels[pos]] = 1
        loss_cls = sigmoid_focal_loss_jit(logits, cls_t, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                          reduction="sum") / num_pos
        reg_p = head.bbox_reg.reshape(-1, 4)[pos]
        reg_t = targets.reg_targets[pos]
        ctr_p = head.ctrness.reshape(-1)[pos]
        ctr_t = self.centerness_targets(reg_t)
        ctr_sum = max(reduce_mean(ctr_t.sum().detach()).item(), 1e-6)
        if pos.numel() > 0:
            p_box = torch.cat([-reg_p[:, :2], reg_p[:, 2:]], dim=1)
            t_box = torch.cat([-reg_t[:, :2], reg_t[:, 2:]], dim=1)
            loss_loc = (giou_loss(p_box, t_box, reduction="none") * ctr_t).sum() / ctr_sum
            loss_ctr = F.binary_cross_entropy_with_logits(ctr_p, ctr_t, reduction="sum") / num_pos
        else:
            loss_loc = head.bbox_reg.sum() * 0
            loss_ctr = head.ctrness.sum() * 0
        return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def detect_single(self, head: HeadOutputs, i: int, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Detections of image ``i`` (AdelaiDet's per-level top-k, then class-wise NMS).

        Returns:
            dict with ``boxes`` (K, 4) XYXY px clipped to ``image_size``, ``scores`` (K,) =
            sqrt(cls prob × centerness), ``classes`` (K,), ``loc_index`` (K,) the location of each
            detection (to fetch its controller parameters and level).
        """
        scores_all = head.logits[i].sigmoid()
        ctr = head.ctrness[i].sigmoid()
        cand_scores = scores_all * ctr[:, None] if self.thresh_with_ctr else scores_all
        cand = cand_scores > self.pre_nms_thresh_test
        scores_all = scores_all * ctr[:, None]
        keep_loc, keep_cls, keep_score = [], [], []
        for lvl in range(len(self.strides)):
            in_lvl = head.levels == lvl
            lvl_idx = torch.nonzero(in_lvl).squeeze(1)
            c = cand[lvl_idx]
            nz = torch.nonzero(c)
            if nz.numel() == 0:
                continue
            s = scores_all[lvl_idx][nz[:, 0], nz[:, 1]]
            k = min(self.pre_nms_topk_test, s.numel())
            s, order = s.topk(k)
            keep_loc.append(lvl_idx[nz[order, 0]])
            keep_cls.append(nz[order, 1])
            keep_score.append(s)
        device = head.logits.device
        if not keep_loc:
            z = torch.zeros(0, dtype=torch.long, device=device)
            return {"boxes": torch.zeros((0, 4), device=device), "scores": torch.zeros(0, device=device),
                    "classes": z, "loc_index": z}
        loc = torch.cat(keep_loc)
        cls = torch.cat(keep_cls)
        score = torch.sqrt(torch.cat(keep_score))
        boxes = head.boxes()[i][loc]
        h, w = image_size
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = batched_nms(boxes, score, cls, self.nms_thresh)[: self.post_nms_topk_test]
        return {"boxes": boxes[keep], "scores": score[keep], "classes": cls[keep], "loc_index": loc[keep]}
