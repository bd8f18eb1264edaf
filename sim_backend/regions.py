"""Mask ↔ Label Studio regions: polygons in percent of the image, and brush RLE.

Coordinate convention: pixel (row i, column j) covers [j, j+1) x [i, i+1) in image pixels; its centre
is at (j + 0.5, i + 0.5). A contour found by OpenCV runs through the centres of the mask's boundary
pixels, so a contour point (j, i) becomes ``x% = 100 (j + 0.5) / W``, ``y% = 100 (i + 0.5) / H``, and
:func:`polygons_to_mask` inverts exactly that. Every conversion between the two lives here.

Engines answer box-local masks (:class:`sim_model.box_to_mask.BoxMasks`): polygons are traced on the
box's crop and shifted by its offset; a brush region, whose RLE covers the whole image, pastes its one
mask. :func:`mask_regions` is the one place that turns a box's mask into the regions of the project's
mask controls (the backend's answers and the pushed predictions).
"""
from __future__ import annotations

import uuid
from typing import Sequence

import cv2
import numpy as np
from label_studio_sdk.converter import brush

from sim_model.box_to_mask import BoxMasks

from .label_config import Control, target_label

_FILL_SHIFT = 8  # fixed-point bits for cv2.fillPoly (sub-pixel vertices)


def new_region_id() -> str:
    """A short random region id, as Label Studio's own ids look (10 characters)."""
    return uuid.uuid4().hex[:10]


def mask_to_polygons(mask: np.ndarray, threshold: float = 0.5, tolerance_px: float = 1.0,
                     min_region_px: int = 16, offset: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """Outline each connected part of a mask with a simplified polygon.

    Args:
        mask: (h, w) float mask probabilities in [0, 1] (or bool): a whole image, or a crop of one.
        threshold: pixels with probability >= threshold are foreground.
        tolerance_px: ``epsilon`` of ``cv2.approxPolyDP`` in pixels (0: no simplification).
        min_region_px: parts with fewer pixels are dropped as specks, except the largest part.
        offset: (column, row) of the mask's top-left pixel in the image (a crop's offset).

    Returns:
        One (K, 2) float64 array of (x, y) pixel-centre coordinates in the image (K >= 3) per kept part,
        largest part first. Holes are not represented (Label Studio polygons have none).
        Empty when the mask has no foreground pixel.

    Raises:
        ValueError: ``mask`` is not 2-D.
    """
    fg = (np.asarray(mask) >= threshold).astype(np.uint8)
    if fg.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {fg.shape}")
    # one pixel of background around the mask: a part that touches the crop's edge is traced exactly as
    # inside the whole image
    fg = np.pad(fg, 1)
    shift = np.array([offset[0] - 1, offset[1] - 1], dtype=np.float64)
    n, cc, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return []
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable") + 1
    polys = []
    for rank, k in enumerate(order):
        if rank > 0 and stats[k, cv2.CC_STAT_AREA] < min_region_px:
            continue
        part = (cc == k).astype(np.uint8)
        contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not contours:
            continue
        contour = max(contours, key=len)
        if tolerance_px > 0 and len(contour) > 3:
            approx = cv2.approxPolyDP(contour, float(tolerance_px), True)
            if len(approx) >= 3:
                contour = approx
        pts = contour.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            # a one- or two-pixel-wide part: outline its pixel squares instead of a degenerate line
            x, y, w, h = cv2.boundingRect(part)
            pts = np.array([[x - 0.5, y - 0.5], [x + w - 0.5, y - 0.5], [x + w - 0.5, y + h - 0.5],
                            [x - 0.5, y + h - 0.5]], dtype=np.float64)
        polys.append(pts + shift)
    return polys


def pixels_to_percent(points_px: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Pixel-centre coordinates (K, 2) → Label Studio percent points, clipped to [0, 100]."""
    p = np.asarray(points_px, dtype=np.float64)
    x = np.clip((p[:, 0] + 0.5) * 100.0 / width, 0.0, 100.0)
    y = np.clip((p[:, 1] + 0.5) * 100.0 / height, 0.0, 100.0)
    return [[round(float(a), 4), round(float(b), 4)] for a, b in zip(x, y)]


def polygons_to_mask(points_list: Sequence[Sequence[Sequence[float]]], width: int, height: int) -> np.ndarray:
    """Rasterise Label Studio polygons (percent points) into one mask; the inverse of the encoding here.

    Args:
        points_list: polygons, each a sequence of [x%, y%] points (``value.points`` of a
            polygonlabels region).
        width, height: image size in pixels.

    Returns:
        (height, width) bool mask, the union of the filled polygons.
    """
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    scale = float(1 << _FILL_SHIFT)
    polys = []
    for pts in points_list:
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        if len(p) < 3:
            continue
        px = np.stack([p[:, 0] * width / 100.0 - 0.5, p[:, 1] * height / 100.0 - 0.5], axis=1)
        polys.append(np.round(px * scale).astype(np.int32))
    if polys:
        cv2.fillPoly(mask, polys, 1, lineType=cv2.LINE_8, shift=_FILL_SHIFT)
    return mask.astype(bool)


def mask_to_brush_rle(mask: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Encode a mask as Label Studio's brush RLE (``label_studio_sdk.converter.brush.mask2rle``).

    Args:
        mask: (H, W) float probabilities in [0, 1], bool, or uint8 already 0/255.
        threshold: foreground threshold (float masks).

    Returns:
        the ``value.rle`` list of a brushlabels region (Label Studio's RLE of the RGBA image; not COCO RLE).
    """
    m = np.asarray(mask)
    if m.dtype != np.uint8:
        m = np.where(m >= threshold, np.uint8(255), np.uint8(0))
    return [int(v) for v in brush.mask2rle(m)]


def brush_rle_to_mask(rle: Sequence[int], width: int, height: int) -> np.ndarray:
    """Decode a Label Studio brush RLE to a (height, width) bool mask (``brush.decode_rle``)."""
    flat = np.asarray(brush.decode_rle(list(rle)), dtype=np.uint8)
    return flat.reshape(int(height), int(width), 4)[:, :, 3] > 0


def polygon_regions(masks: BoxMasks, k: int, label: str, target: Control, *, threshold: float,
                    tolerance_px: float, min_region_px: int) -> list[dict]:
    """polygonlabels regions for box-local mask ``k``: one region per connected part.

    Args:
        masks: an engine's :class:`~sim_model.box_to_mask.BoxMasks`.
        k: the mask; its score ``masks.scores[k]`` is copied to each region.
        label: a label of ``target``.
        target: the PolygonLabels control (``from_name``, ``to_name``).
        threshold, tolerance_px, min_region_px: see :func:`mask_to_polygons`.

    Returns:
        Label Studio result items (empty when the mask has no foreground).
    """
    h, w = masks.image_size
    c0, r0 = (int(v) for v in masks.bounds[k][:2])
    out = []
    for pts in mask_to_polygons(masks.crops[k], threshold, tolerance_px, min_region_px, offset=(c0, r0)):
        out.append({
            "id": new_region_id(), "type": "polygonlabels", "from_name": target.name,
            "to_name": target.to_name, "original_width": int(w), "original_height": int(h),
            "image_rotation": 0,
            "value": {"points": pixels_to_percent(pts, w, h), "closed": True, "polygonlabels": [label]},
            "score": float(masks.scores[k]),
        })
    return out


def _full_uint8(masks: BoxMasks, k: int, threshold: float) -> np.ndarray:
    """Box-local mask ``k`` pasted as a 0/255 uint8 image (one byte per pixel, the brush RLE's input)."""
    c0, r0, c1, r1 = (int(v) for v in masks.bounds[k])
    out = np.zeros(masks.image_size, np.uint8)
    out[r0:r1, c0:c1] = np.where(masks.foreground(k, threshold), np.uint8(255), np.uint8(0))
    return out


def brush_region(masks: BoxMasks, k: int, label: str, target: Control, *, threshold: float) -> dict | None:
    """One brushlabels region for box-local mask ``k`` (None when it has no foreground pixel).

    Args:
        masks: an engine's :class:`~sim_model.box_to_mask.BoxMasks`.
        k: the mask; its score is the region's.
        label: a label of ``target``.
        target: the BrushLabels control.
        threshold: foreground threshold.
    """
    if not masks.foreground(k, threshold).any():
        return None
    h, w = masks.image_size
    return {
        "id": new_region_id(), "type": "brushlabels", "from_name": target.name, "to_name": target.to_name,
        "original_width": int(w), "original_height": int(h), "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(_full_uint8(masks, k, threshold)), "brushlabels": [label]},
        "score": float(masks.scores[k]),
    }


def mask_regions(masks: BoxMasks, k: int, box_label: str, targets: Sequence[Control], *, threshold: float,
                 tolerance_px: float, min_region_px: int) -> list[dict]:
    """The regions of box-local mask ``k`` in every mask control of ``targets`` that has the box's label.

    PolygonLabels targets get :func:`polygon_regions`, BrushLabels targets :func:`brush_region`; the label
    is mapped by :func:`sim_backend.label_config.target_label` (a target without it is passed over).

    Args:
        masks, k: the mask (:class:`~sim_model.box_to_mask.BoxMasks` and its index).
        box_label: the label of the box the mask was made for.
        targets: the mask controls to fill, in order.
        threshold, tolerance_px, min_region_px: see :func:`mask_to_polygons`.

    Returns:
        Label Studio result items; empty when the mask has no foreground pixel or no target has the label.
    """
    out: list[dict] = []
    for t in targets:
        label = target_label(box_label, t)
        if label is None:
            continue
        if t.tag == "brushlabels":
            region = brush_region(masks, k, label, t, threshold=threshold)
            out += [region] if region is not None else []
        else:
            out += polygon_regions(masks, k, label, t, threshold=threshold, tolerance_px=tolerance_px,
                                   min_region_px=min_region_px)
    return out


def rectangle_to_xyxy(value: dict, width: int, height: int) -> np.ndarray:
    """A rectanglelabels ``value`` (percent) → box XYXY in pixels of a ``width`` x ``height`` image.

    Args:
        value: ``{"x", "y", "width", "height"[, "rotation"]}`` in percent of the image; ``rotation`` in
            degrees, clockwise about the top-left corner (Label Studio's convention).
        width, height: image size in pixels.

    Returns:
        (4,) float64 [x0, y0, x1, y1] in pixels; a rotated rectangle gives its axis-aligned bounding
        box. Not clipped (see :func:`sim_model.box_to_mask.check_boxes`).

    Raises:
        ValueError: a missing or non-numeric coordinate.
    """
    try:
        x = float(value["x"]) * width / 100.0
        y = float(value["y"]) * height / 100.0
        w = float(value["width"]) * width / 100.0
        h = float(value["height"]) * height / 100.0
        rot = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"rectangle value needs numeric x, y, width, height: {value!r}") from e
    if rot % 360.0 == 0.0:
        return np.array([x, y, x + w, y + h], dtype=np.float64)
    t = np.deg2rad(rot)
    u = np.array([np.cos(t), np.sin(t)]) * w      # along the rotated top edge
    v = np.array([-np.sin(t), np.cos(t)]) * h     # along the rotated left edge
    p0 = np.array([x, y])
    corners = np.stack([p0, p0 + u, p0 + u + v, p0 + v])
    return np.concatenate([corners.min(0), corners.max(0)]).astype(np.float64)
