"""Shape-prior box→mask engines: the filled box (the floor every method must beat) and the inscribed ellipse.

They need no image content. :func:`box_mask` and :func:`ellipse_mask` are also the rasterisers that
:class:`sim_model.engines.grabcut.GrabCutBoxToMask` uses for its crop, its clipping and its fallback.

Rasterisation convention (shared by both): pixel (row i, column j) covers [j, j+1) x [i, i+1) in the
XYXY pixel frame; a box covers every pixel that it overlaps (x0 rounded down, x1 rounded up), so a
box narrower than one pixel still covers one column.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from sim_model.box_to_mask import BoxToMask


def box_pixel_bounds(box: np.ndarray, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer pixel bounds covered by a box.

    Args:
        box: (4,) float XYXY in pixels.
        image_hw: (H, W) of the image in pixels.

    Returns:
        (c0, r0, c1, r1): columns c0..c1-1 and rows r0..r1-1 (half-open), clipped to the image and
        at least one pixel wide and high.
    """
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    c0 = int(np.clip(np.floor(x0), 0, w - 1))
    r0 = int(np.clip(np.floor(y0), 0, h - 1))
    c1 = int(np.clip(np.ceil(x1), c0 + 1, w))
    r1 = int(np.clip(np.ceil(y1), r0 + 1, h))
    return c0, r0, c1, r1


def box_mask(image_hw: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """The filled box as a mask.

    Args:
        image_hw: (H, W) in pixels.
        box: (4,) float XYXY in pixels.

    Returns:
        (H, W) bool, True on the pixels the box covers (see the module's rasterisation convention).
    """
    c0, r0, c1, r1 = box_pixel_bounds(box, image_hw)
    m = np.zeros(image_hw, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def ellipse_mask(image_hw: tuple[int, int], box: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The ellipse inscribed in a box (axis-aligned, centred on the box), optionally scaled.

    A pixel belongs to the ellipse when its centre does; a box whose ellipse covers no pixel centre
    (sub-pixel boxes) falls back to the pixel nearest the box centre, so the mask is never empty.

    Args:
        image_hw: (H, W) in pixels.
        box: (4,) float XYXY in pixels.
        scale: semi-axes are ``scale`` times half the box width/height (1.0 = inscribed).

    Returns:
        (H, W) bool, True inside the ellipse and inside the box.
    """
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ax, ay = max((x1 - x0) / 2 * scale, 1e-6), max((y1 - y0) / 2 * scale, 1e-6)
    c0, r0, c1, r1 = box_pixel_bounds(box, image_hw)
    jj = np.arange(c0, c1) + 0.5
    ii = np.arange(r0, r1) + 0.5
    inside = ((jj[None, :] - cx) / ax) ** 2 + ((ii[:, None] - cy) / ay) ** 2 <= 1.0
    m = np.zeros(image_hw, dtype=bool)
    m[r0:r1, c0:c1] = inside
    if not inside.any():
        m[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))] = True
    return m


class FilledBoxEngine(BoxToMask):
    """The floor: every box filled as its own mask, score 1.0.

    On coco-mini val2017 this gives the reference figures of coco-mini's README (mean IoU ~0.58,
    segm AP ~21.7); see docs/benchmarks.md for the measured row ``box``.
    """

    model_version = "filled-box"

    def predict(self, image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`BoxToMask.predict`. Masks are (N, H, W) float32 in {0, 1}; scores (N,) float32 ones."""
        boxes = self._check_inputs(image, boxes, labels)
        hw = image.shape[:2]
        masks = np.zeros((len(boxes),) + hw, np.float32)
        for k, b in enumerate(boxes):
            masks[k] = box_mask(hw, b)
        return masks, np.ones(len(boxes), np.float32)


class EllipseEngine(BoxToMask):
    """The inscribed ellipse of every box as its mask, score 1.0 (a shape prior with no image content)."""

    model_version = "inscribed-ellipse"

    def predict(self, image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`BoxToMask.predict`. Masks are (N, H, W) float32 in {0, 1}; scores (N,) float32 ones."""
        boxes = self._check_inputs(image, boxes, labels)
        hw = image.shape[:2]
        masks = np.zeros((len(boxes),) + hw, np.float32)
        for k, b in enumerate(boxes):
            masks[k] = ellipse_mask(hw, b)
        return masks, np.ones(len(boxes), np.float32)


__all__ = ["box_pixel_bounds", "box_mask", "ellipse_mask", "FilledBoxEngine", "EllipseEngine"]
