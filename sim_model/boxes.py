"""Boxes and their pixels: the one rasterisation convention of the project.

Boxes are XYXY in pixels, x to the right and y down. Pixel (row i, column j) covers [j, j+1) x [i, i+1),
so its centre is (j + 0.5, i + 0.5). A box **covers** every pixel it overlaps: columns floor(x0) …
ceil(x1) - 1 and rows floor(y0) … ceil(y1) - 1, clipped to the image and at least one pixel wide and
high (a box thinner than a pixel still covers one column). :func:`box_pixel_bounds` gives those
bounds for one box (NumPy, used by every engine for its box-local mask), :func:`box_masks` rasterises
many boxes at once (torch, full resolution or sampled at a stride for the network's mask grid);
:func:`mask_boxes` goes the other way, from masks to their tight boxes. :func:`context_window` is the
window around a box that the close look (the network on a crop around the box) sees, in training and
at inference; :func:`visible_box_share` how much of a box such a window (or any view) holds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


def box_pixel_bounds(box: Sequence[float] | np.ndarray, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer pixel bounds covered by one box (module docstring).

    Args:
        box: (4,) float XYXY in pixels.
        image_hw: (H, W) of the image in pixels.

    Returns:
        (c0, r0, c1, r1): columns c0 … c1-1 and rows r0 … r1-1 (half-open), clipped to the image and at
        least one pixel wide and high.
    """
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    c0 = int(np.clip(np.floor(x0), 0, w - 1))
    r0 = int(np.clip(np.floor(y0), 0, h - 1))
    c1 = int(np.clip(np.ceil(x1), c0 + 1, w))
    r1 = int(np.clip(np.ceil(y1), r0 + 1, h))
    return c0, r0, c1, r1


def context_window(box: Sequence[float] | np.ndarray, image_hw: tuple[int, int], context: float,
                   shift: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int, int]:
    """The pixel window around a box that a close look crops: the box scaled by ``context`` about its
    centre (moved by ``shift``), made pixel-covering and clipped to the image.

    Args:
        box: (4,) float XYXY in pixels.
        image_hw: (H, W) of the image in pixels.
        context: window side / box side (>= 1: the box's pixel bounds always lie inside the window
            when ``shift`` is 0).
        shift: centre shift (dx, dy) as fractions of the box's width and height (training jitter).

    Returns:
        (x0, y0, x1, y1) int half-open window, at least one pixel wide and high, inside the image.

    Raises:
        ValueError: ``context`` < 1.
    """
    if not context >= 1.0:
        raise ValueError(f"context must be >= 1, got {context}")
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    cx, cy = (x0 + x1) / 2 + shift[0] * bw, (y0 + y1) / 2 + shift[1] * bh
    return box_pixel_bounds((cx - context * bw / 2, cy - context * bh / 2, cx + context * bw / 2,
                             cy + context * bh / 2), (h, w))


def box_masks(boxes: "torch.Tensor", height: int, width: int, stride: int = 1) -> "torch.Tensor":
    """Filled-box masks of many boxes: the pixels of :func:`box_pixel_bounds`, batched.

    With ``stride`` > 1 the full-resolution masks are sampled at the pixel centres of a grid of
    that stride (rows and columns ``stride // 2 + k * stride``), the positions of the network's mask
    output at that stride (CondInst's mask output stride 4).

    Args:
        boxes: (N, 4) float XYXY in pixels.
        height, width: image size in pixels (for a grid, the padded input size).
        stride: 1 for full resolution, else the grid stride in pixels.

    Returns:
        (N, ceil((height - stride // 2) / stride), ceil((width - stride // 2) / stride)) bool, i.e.
        (N, height, width) at stride 1 and (N, height / stride, width / stride) for sizes that are
        multiples of ``stride``.

    Raises:
        ValueError: ``boxes`` is not (N, 4), or ``stride`` < 1.
    """
    import torch  # deferred: the backend's cold start needs only the NumPy helpers of this module

    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) XYXY, got shape {tuple(boxes.shape)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    b = boxes.to(torch.float32)
    c0 = b[:, 0].floor().clamp(0, width - 1)
    r0 = b[:, 1].floor().clamp(0, height - 1)
    c1 = torch.maximum(b[:, 2].ceil().clamp(max=width), c0 + 1)
    r1 = torch.maximum(b[:, 3].ceil().clamp(max=height), r0 + 1)
    start = stride // 2
    ys = torch.arange(start, height, stride, dtype=torch.float32, device=b.device)
    xs = torch.arange(start, width, stride, dtype=torch.float32, device=b.device)
    in_y = (ys[None, :] >= r0[:, None]) & (ys[None, :] < r1[:, None])  # (N, Hs)
    in_x = (xs[None, :] >= c0[:, None]) & (xs[None, :] < c1[:, None])  # (N, Ws)
    return in_y[:, :, None] & in_x[:, None, :]


def mask_boxes(masks: "torch.Tensor | np.ndarray") -> "torch.Tensor":
    """Tight XYXY boxes in pixels of binary masks, covering whole pixels (x1 = last column + 1).

    Args:
        masks: (N, H, W) bool (torch or NumPy); every mask must have at least one pixel.

    Returns:
        (N, 4) float32 XYXY in pixels (detectron2's ``BitMasks.get_bounding_boxes`` convention; the
        inverse of :func:`box_masks` for a filled box with integer corners).
    """
    import torch  # deferred: see box_masks
    from torchvision.ops import masks_to_boxes

    masks = torch.as_tensor(masks)
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    b = masks_to_boxes(masks.bool()).to(torch.float32)
    b[:, 2:] += 1.0
    return b


def visible_box_share(boxes: "np.ndarray | torch.Tensor", image_hw: tuple[int, int]) -> "torch.Tensor":
    """Share of each box's area inside the image (detectron2's ``Boxes.clip`` and ``Boxes.area``).

    Args:
        boxes: (N, 4) float XYXY in pixels of the view, not clipped (they may reach outside it).
        image_hw: (h, w) of the view in pixels.

    Returns:
        (N,) float32 in [0, 1]; 1 for an empty box.
    """
    import torch  # deferred: see box_masks
    from detectron2.structures import Boxes

    whole = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inside = whole.clone()
    inside.clip(image_hw)
    area = whole.area()
    return torch.where(area > 0, inside.area() / area.clamp(min=1e-12), torch.ones_like(area))


def xywh_to_xyxy(bbox: Sequence[float]) -> np.ndarray:
    """COCO [x, y, w, h] (pixels) → (4,) float32 XYXY (pixels)."""
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x, y, x + w, y + h], np.float32)


__all__ = ["box_pixel_bounds", "box_masks", "context_window", "mask_boxes", "visible_box_share", "xywh_to_xyxy"]
