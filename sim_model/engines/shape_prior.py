"""Shape-prior box→mask engines: the filled box (the floor every method must beat) and the inscribed ellipse.

They need no image content. :func:`ellipse_mask` is also the shape prior that
:class:`sim_model.engines.grabcut.GrabCutBoxToMask` falls back to. Pixels follow the convention of
:mod:`sim_model.boxes`; a pixel belongs to the ellipse when its centre does.
"""
from __future__ import annotations

import numpy as np

from sim_model.box_to_mask import BoxToMask
from sim_model.boxes import box_pixel_bounds


def ellipse_mask(image_hw: tuple[int, int], box: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The ellipse inscribed in a box (axis-aligned, centred on the box), optionally scaled, over the box.

    A pixel belongs to the ellipse when its centre does; a box whose ellipse covers no pixel centre
    (sub-pixel boxes) falls back to the pixel nearest the box centre, so the mask is never empty.

    Args:
        image_hw: (H, W) of the image in pixels (it clips the box's pixel bounds).
        box: (4,) float XYXY in pixels.
        scale: semi-axes are ``scale`` times half the box width/height (1.0 = inscribed).

    Returns:
        (r1 - r0, c1 - c0) bool over the box's pixel bounds (:func:`sim_model.boxes.box_pixel_bounds`),
        True inside the ellipse.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ax, ay = max((x1 - x0) / 2 * scale, 1e-6), max((y1 - y0) / 2 * scale, 1e-6)
    c0, r0, c1, r1 = box_pixel_bounds(box, image_hw)
    jj = np.arange(c0, c1) + 0.5
    ii = np.arange(r0, r1) + 0.5
    inside = ((jj[None, :] - cx) / ax) ** 2 + ((ii[:, None] - cy) / ay) ** 2 <= 1.0
    if not inside.any():
        h, w = image_hw
        inside[int(np.clip(cy, 0, h - 1)) - r0, int(np.clip(cx, 0, w - 1)) - c0] = True
    return inside


class FilledBoxEngine(BoxToMask):
    """The floor: every box filled as its own mask, score 1.0 (see docs/benchmarks.md, row ``box``)."""

    model_version = "filled-box"

    def _predict(self, image, boxes, labels):
        """Masks are ones over each box's pixel bounds; scores are ones."""
        hw = image.shape[:2]
        crops = []
        for b in boxes:
            c0, r0, c1, r1 = box_pixel_bounds(b, hw)
            crops.append(np.ones((r1 - r0, c1 - c0), np.float32))
        return crops, np.ones(len(boxes), np.float32)


class EllipseEngine(BoxToMask):
    """The inscribed ellipse of every box as its mask, score 1.0 (a shape prior with no image content)."""

    model_version = "inscribed-ellipse"

    def _predict(self, image, boxes, labels):
        """Masks are {0, 1} ellipses over each box's pixel bounds; scores are ones."""
        hw = image.shape[:2]
        return [ellipse_mask(hw, b).astype(np.float32) for b in boxes], np.ones(len(boxes), np.float32)


__all__ = ["ellipse_mask", "FilledBoxEngine", "EllipseEngine"]
