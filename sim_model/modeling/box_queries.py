"""Box queries on a trained CondInst: what the network says about one given box.

The SIM engine answers a drawn box the way SIM builds its pseudo masks in training, from the
locations that training would make positives of that box. Per image, :func:`image_features` runs the
network once (the momentum teacher when the model has one, as in training); per box,
:func:`positive_masks` finds those locations and runs the dynamic mask head on them (cheap).
:meth:`ImageFeatures.to_image_window` resamples maps from the mask grid to the pixels of one box of
the original image, exactly as CondInst's postprocessing would over the whole image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sim_model.modeling.mask_head import aligned_bilinear
from sim_model.modeling.network import CondInstNet, NetOutputs


@dataclass
class ImageFeatures:
    """Everything computed once per image for the box→mask predictor (:func:`image_features`).

    Attributes:
        out: the network pass on this one image (batch of 1).
        net: the network that produced it (teacher copy or student).
        mask_features: (D, Hm, Wm) float mask features Z at ``mask_stride`` (bilinear ×2 of the
            stride-8 branch output), NOT L2-normalised (normalise along dim 0 for SIM Eq. 1).
        image_size: (h, w) of the image given to :func:`image_features`, in pixels.
        padded_size: (Hp, Wp) after padding; Hm = Hp / mask_stride.
        mask_stride: the mask-output stride (4).
    """

    out: NetOutputs
    net: CondInstNet
    mask_features: torch.Tensor
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
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
    """One network pass on one image for the box→mask predictor.

    Args:
        model: a ``CondInst`` (:mod:`sim_model.condinst`).
        image: (3, H, W) uint8 or float, channel order ``cfg.INPUT.FORMAT``, already resized by the test
            transform.
        use_teacher: None = the momentum teacher when the model has one (SIM's pseudo masks come from
            it), else the student; False = the student.

    Returns:
        :class:`ImageFeatures`; its head outputs have no class logits (``logits`` (1, L, 0)): a box→mask
        query knows its box and label, so the classification tower is skipped (balloon's close look on one
        CPU thread: 58 → 48 ms per box).

    Raises:
        ValueError: image not (3, H, W).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    teacher = model.teacher
    net = teacher.model if (teacher is not None and use_teacher is not False) else model.net
    was_training = net.training
    net.eval()
    try:
        images = model.preprocess_image([image])
        out = net(images.tensor, with_cls=False)
    finally:
        net.train(was_training)
        if teacher is not None:
            teacher.model.eval()
    z = aligned_bilinear(out.mask_feats, net.mask_head.mask_feat_stride // model.mask_out_stride)[0]
    return ImageFeatures(out=out, net=net, mask_features=z, image_size=tuple(images.image_sizes[0]),
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
    head = feats.out.head
    device = head.locations.device
    box = torch.as_tensor(box, dtype=torch.float32, device=device).reshape(4)
    fcos = feats.net.fcos
    _, _, idx = fcos.assign_targets_single(head.locations, head.levels, head.strides, box[None],
                                           torch.zeros(1, dtype=torch.long, device=device))
    loc = torch.nonzero(idx >= 0).squeeze(1)
    if loc.numel() == 0:
        p3 = torch.nonzero(head.levels == 0).squeeze(1)
        centre = (box[:2] + box[2:]) / 2
        d = (head.locations[p3] - centre[None]).abs().sum(dim=1)
        loc = p3[d.argmin()].reshape(1)
    im = torch.zeros_like(loc)
    logits = feats.net.mask_logits(feats.out, im, loc)[:, 0]
    return head.boxes()[0][loc], logits


__all__ = ["ImageFeatures", "image_features", "positive_masks", "resize_bilinear_window"]
