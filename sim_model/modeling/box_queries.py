"""Box queries on a trained CondInst: what the network says about one given box.

The SIM engine answers a drawn box the way SIM builds its pseudo masks in training, from the
locations that training would make positives of that box. Per image, :func:`image_features` runs the
backbone, FPN and mask branch once (the momentum teacher when the model has one, as in training); per
box, :func:`positive_masks` finds those locations, runs the FCOS head on their levels (each level once
per image) and the dynamic mask head on them.
:meth:`ImageFeatures.to_image_window` resamples maps from the mask grid to the pixels of one box of
the original image, exactly as CondInst's postprocessing would over the whole image.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from sim_model.modeling.fcos import decode_boxes
from sim_model.modeling.mask_head import aligned_bilinear
from sim_model.modeling.network import CondInstNet


def in_training_mode(net: torch.nn.Module) -> bool:
    """Whether ``net`` or any of its submodules is in training mode."""
    return any(m.training for m in net.modules())


@contextmanager
def eval_mode(net: torch.nn.Module) -> Iterator[None]:
    """Run ``net`` in eval mode (a norm layer must neither use nor update batch statistics), then restore
    every submodule's own previous mode (a part kept in eval mode inside a training network, e.g. a frozen
    teacher, stays so). A network already wholly in eval mode (a served engine's) is left alone: switching
    modes walks every submodule twice, ~2 ms per call on a CPU (a close-look box makes three such calls)."""
    modes = [(m, m.training) for m in net.modules()]
    if not any(training for _, training in modes):
        yield
        return
    net.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class MaskGrid:
    """The mask grid of one network input and its way back to image pixels (CondInst's postprocessing).

    Attributes:
        image_size: (h, w) of the (resized, unpadded) network input, in pixels.
        mask_stride: the mask-output stride (4): the grid is (Hp / mask_stride, Wp / mask_stride) of the
            padded input.
    """

    image_size: tuple[int, int]
    mask_stride: int

    def _upsampled(self, maps: torch.Tensor) -> torch.Tensor:
        """(K, Hm, Wm) → (K, h, w): aligned-bilinear ×``mask_stride``, cropped to ``image_size``."""
        h, w = self.image_size
        return aligned_bilinear(maps[:, None].float(), self.mask_stride)[:, 0, :h, :w]

    def to_image(self, maps: torch.Tensor, output_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Resample maps on the mask grid to image pixels (CondInst's postprocessing).

        Args:
            maps: (K, Hm, Wm) float maps (probabilities or logits) on the mask grid.
            output_size: (H, W) of the result; default ``image_size``.

        Returns:
            (K, H, W) float: aligned-bilinear ×``mask_stride``, cropped to ``image_size``, then
            bilinear-resized to ``output_size``.
        """
        h, w = output_size or self.image_size
        if maps.shape[0] == 0:
            return maps.new_zeros((0, h, w))
        x = self._upsampled(maps)
        if (h, w) != tuple(self.image_size):
            x = F.interpolate(x[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return x

    def to_image_window(self, maps: torch.Tensor, output_size: tuple[int, int],
                        bounds: tuple[int, int, int, int]) -> torch.Tensor:
        """:meth:`to_image` evaluated only on the pixels of ``bounds`` (the same values, box-local memory).

        Args:
            maps: (K, Hm, Wm) float maps on the mask grid.
            output_size: (H, W) of the whole output image in pixels.
            bounds: (c0, r0, c1, r1) half-open pixel window of that image.

        Returns:
            (K, r1 - r0, c1 - c0) float.
        """
        c0, r0, c1, r1 = (int(v) for v in bounds)
        x = self._upsampled(maps)
        if tuple(output_size) == tuple(self.image_size):
            return x[:, r0:r1, c0:c1]
        return resize_bilinear_window(x, output_size, (c0, r0, c1, r1))


@dataclass
class ImageFeatures(MaskGrid):
    """Everything computed once per image for the box→mask predictor (:func:`image_features`), on the
    image's :class:`MaskGrid`.

    The FCOS head (box tower, regression, controller) runs lazily, one FPN level at a time, on the levels
    that a queried box's positives lie on (:meth:`head_at`), and each level's outputs are kept: a box in a
    close look lies on one or two levels, and P3 alone holds three quarters of the locations.

    Attributes:
        net: the network that produced it (teacher copy or student).
        head_features: per FCOS level (``MODEL.FCOS.IN_FEATURES``) the (1, C, H_l, W_l) float FPN features.
        locations: (L, 2) float (x, y) pixel coordinates of all levels' locations (the order of
            :class:`~sim_model.modeling.fcos.HeadOutputs`).
        levels: (L,) long FPN level of each location (0 = P3).
        strides: (L,) float stride in pixels of each location's level.
        mask_feats: (1, D, Hp/8, Wp/8) float mask-branch output (the dynamic mask head's input).
        mask_features: (D, Hm, Wm) float mask features Z at ``mask_stride`` (bilinear ×2 of the
            stride-8 branch output), NOT L2-normalised (normalise along dim 0 for SIM Eq. 1).
        image_size: (h, w) of the image given to :func:`image_features`, in pixels (:class:`MaskGrid`).
        padded_size: (Hp, Wp) after padding; Hm = Hp / mask_stride.
        mask_stride: the mask-output stride (4) (:class:`MaskGrid`).
    """

    net: CondInstNet
    head_features: list[torch.Tensor]
    locations: torch.Tensor
    levels: torch.Tensor
    strides: torch.Tensor
    mask_feats: torch.Tensor
    mask_features: torch.Tensor
    padded_size: tuple[int, int]
    _head: dict = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def head_at(self, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The FCOS head's regressed boxes and controller outputs at some locations.

        Runs :meth:`~sim_model.modeling.fcos.FCOSHead.forward_level` (no classification tower) on each
        level of ``loc`` not yet computed for this image; the same values as the full head pass. Two
        threads asking for the same new level both compute it (identical results, one is kept).

        Args:
            loc: (P,) long location indices (rows of ``locations``).

        Returns:
            boxes: (P, 4) float XYXY in pixels of the padded input; params: (P, G) float dynamic mask-head
            parameters.
        """
        levels = self.levels[loc]
        sizes = [f.shape[-2] * f.shape[-1] for f in self.head_features]
        starts = [sum(sizes[:lvl]) for lvl in range(len(sizes))]
        reg = self.locations.new_empty((loc.numel(), 4))
        params = None
        for lvl in levels.unique().tolist():
            hit = self._head.get(lvl)
            if hit is None:
                with eval_mode(self.net):
                    _, r, _, top = self.net.fcos.head.forward_level(self.head_features[lvl], lvl, with_cls=False)
                hit = (r[0].flatten(1).T, top[0].flatten(1).T)  # (H_l*W_l, 4), (H_l*W_l, G)
                self._head[lvl] = hit
            sel = levels == lvl
            if params is None:
                params = hit[1].new_empty((loc.numel(), hit[1].shape[1]))
            reg[sel] = hit[0][loc[sel] - starts[lvl]]
            params[sel] = hit[1][loc[sel] - starts[lvl]]
        return decode_boxes(reg, self.locations[loc], self.strides[loc]), params


def _source_weights(n_in: int, n_out: int, start: int, stop: int, device) -> tuple[torch.Tensor, ...]:
    """Source rows (or columns) and weights of output indices ``start … stop-1`` of a bilinear resize
    from ``n_in`` to ``n_out`` samples with ``align_corners=False`` (PyTorch's ``upsample_bilinear2d``)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    idx = torch.arange(start, stop, dtype=torch.float32, device=device)
    src = (scale * (idx + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    lam = (src - i0.to(src.dtype)).clamp(0.0, 1.0)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, lam


def resize_bilinear_window(x: torch.Tensor, output_size: tuple[int, int],
                           bounds: tuple[int, int, int, int]) -> torch.Tensor:
    """A window of ``F.interpolate(x[:, None], output_size, mode="bilinear", align_corners=False)``.

    Args:
        x: (K, h, w) float maps.
        output_size: (H, W) of the full resized maps.
        bounds: (c0, r0, c1, r1) half-open window of the resized maps to compute.

    Returns:
        (K, r1 - r0, c1 - c0) float, equal to that window of the full resize (to float rounding).
    """
    c0, r0, c1, r1 = bounds
    h, w = x.shape[-2:]
    y0, y1, ly = _source_weights(h, output_size[0], r0, r1, x.device)
    x0, x1, lx = _source_weights(w, output_size[1], c0, c1, x.device)
    lx, ly = lx.to(x.dtype), ly.to(x.dtype)
    top = x[:, y0]
    bottom = x[:, y1]
    row_top = top[:, :, x0] * (1 - lx) + top[:, :, x1] * lx
    row_bottom = bottom[:, :, x0] * (1 - lx) + bottom[:, :, x1] * lx
    return row_top * (1 - ly)[:, None] + row_bottom * ly[:, None]


@torch.no_grad()
def image_features(model, image: torch.Tensor, use_teacher: Optional[bool] = None) -> ImageFeatures:
    """The per-image part of a box query: backbone + FPN and the mask branch (the FCOS head runs per level
    when a box needs it, :meth:`ImageFeatures.head_at`).

    Args:
        model: a ``CondInst`` (:mod:`sim_model.condinst`).
        image: (3, H, W) uint8 or float, channel order ``cfg.INPUT.FORMAT``, already resized by the test
            transform.
        use_teacher: None = the momentum teacher when the model has one (SIM's pseudo masks come from
            it), else the student; False = the student.

    Returns:
        :class:`ImageFeatures`. A box→mask query knows its box and label: the classification tower is never
        run (balloon's close look on one CPU thread: 58 → 48 ms per box), nor the head on the levels that
        hold none of the box's positives.

    Raises:
        ValueError: image not (3, H, W).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    teacher = model.teacher
    net = teacher.model if (teacher is not None and use_teacher is not False) else model.net
    try:
        with eval_mode(net):
            images = model.preprocess_image([image])
            features = net.backbone(images.tensor)
            mask_feats = net.mask_branch([features[f] for f in net.mask_in_features])
    finally:
        if teacher is not None and in_training_mode(teacher.model):
            teacher.model.eval()
    head_features = [features[f] for f in net.in_features]
    locations, levels, strides = net.fcos.locations(head_features)
    z = aligned_bilinear(mask_feats, net.mask_head.mask_feat_stride // model.mask_out_stride)[0]
    return ImageFeatures(net=net, head_features=head_features, locations=locations, levels=levels, strides=strides,
                         mask_feats=mask_feats, mask_features=z, image_size=tuple(images.image_sizes[0]),
                         padded_size=tuple(images.tensor.shape[-2:]), mask_stride=model.mask_out_stride)


@torch.no_grad()
def positive_masks(feats: ImageFeatures, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive locations of a box, their regressed boxes and mask logits (for M_I, SIM Eq. 6).

    The positives are the locations that training would assign to that box (FCOS centre sampling and
    FPN size ranges); a box with none (smaller than a stride) gets the P3 location nearest its centre.

    Args:
        feats: from :func:`image_features`.
        box: (4,) float XYXY in pixels of the image given to :func:`image_features`.

    Returns:
        pred_boxes: (P, 4) float XYXY px; mask_logits: (P, Hm, Wm) float at ``feats.mask_stride``; P >= 1.
    """
    device = feats.locations.device
    box = torch.as_tensor(box, dtype=torch.float32, device=device).reshape(4)
    _, _, idx = feats.net.fcos.assign_targets_single(feats.locations, feats.levels, feats.strides, box[None],
                                                     torch.zeros(1, dtype=torch.long, device=device))
    loc = torch.nonzero(idx >= 0).squeeze(1)
    if loc.numel() == 0:
        p3 = torch.nonzero(feats.levels == 0).squeeze(1)
        centre = (box[:2] + box[2:]) / 2
        d = (feats.locations[p3] - centre[None]).abs().sum(dim=1)
        loc = p3[d.argmin()].reshape(1)
    pred_boxes, params = feats.head_at(loc)
    logits = feats.net.mask_head(feats.mask_feats, params, torch.zeros_like(loc), feats.locations[loc],
                                 feats.levels[loc])[:, 0]
    return pred_boxes, logits


__all__ = ["MaskGrid", "ImageFeatures", "image_features", "positive_masks", "resize_bilinear_window"]
