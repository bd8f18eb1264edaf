"""The one box→mask interface that the backend, the benchmark and the retrain scores all use.

An engine turns an RGB image and N boxes (XYXY, pixels) with their labels into N soft masks and N
quality scores. Two engines implement it: :class:`sim_model.engines.grabcut.GrabCutBoxToMask` (cold
start, no training) and the SIM predictor (a trained model version, see issue 3).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class BoxToMaskError(ValueError):
    """Raised for input that no engine can turn into masks (bad image array, malformed boxes)."""


@dataclass(frozen=True)
class BoxCheck:
    """Result of :func:`check_boxes` for one box.

    Attributes:
        box: (4,) float32 XYXY in pixels, clipped to the image (meaningful only when ``ok``).
        ok: whether the box can be segmented.
        reason: empty when ``ok``; otherwise a human-readable reason ("zero area", "outside the image").
    """

    box: np.ndarray
    ok: bool
    reason: str = ""


def check_image(image: np.ndarray) -> None:
    """Validate an image array.

    Args:
        image: (H, W, 3) uint8 RGB.

    Raises:
        BoxToMaskError: if the array is not (H, W, 3) uint8 with H, W >= 1.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise BoxToMaskError(f"image must be an (H, W, 3) RGB array, got shape {getattr(image, 'shape', None)}")
    if image.dtype != np.uint8:
        raise BoxToMaskError(f"image must be uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise BoxToMaskError(f"image is empty: {image.shape}")


def check_boxes(boxes: np.ndarray, image_hw: tuple[int, int], min_size: float = 1.0) -> list[BoxCheck]:
    """Clip boxes to the image and flag the ones that cannot be segmented.

    Args:
        boxes: (N, 4) float XYXY in pixels (x0, y0, x1, y1), x to the right, y down.
        image_hw: (H, W) of the image in pixels.
        min_size: smallest width and height in pixels, after clipping, of a usable box.

    Returns:
        One :class:`BoxCheck` per box, in order. A box is not ok when it has a non-finite coordinate,
        when x1 <= x0 or y1 <= y0 ("zero area"), when it lies entirely outside the image
        ("outside the image"), or when its clipped part is smaller than ``min_size`` pixels.

    Raises:
        BoxToMaskError: if ``boxes`` is not an (N, 4) array.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BoxToMaskError(f"boxes must be an (N, 4) XYXY array, got shape {boxes.shape}")
    h, w = image_hw
    out = []
    for b in boxes:
        if not np.all(np.isfinite(b)):
            out.append(BoxCheck(b.astype(np.float32), False, "non-finite coordinate"))
            continue
        x0, y0, x1, y1 = b
        if x1 <= x0 or y1 <= y0:
            out.append(BoxCheck(b.astype(np.float32), False, f"zero area box {b.round(2).tolist()}"))
            continue
        c = np.array([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)])
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            out.append(BoxCheck(c.astype(np.float32), False,
                                f"box {b.round(2).tolist()} is outside the {w}x{h} image"))
            continue
        if c[2] - c[0] < min_size or c[3] - c[1] < min_size:
            out.append(BoxCheck(c.astype(np.float32), False,
                                f"box {b.round(2).tolist()} is smaller than {min_size} px inside the image"))
            continue
        out.append(BoxCheck(c.astype(np.float32), True))
    return out


def sim_model_version(version: str) -> str:
    """The ``model_version`` reported for a SIM registry version, e.g. ``"v0003"`` → ``"sim-v0003"``."""
    return f"sim-{version}"


class BoxToMask(abc.ABC):
    """Box→mask engine.

    Subclasses set :attr:`model_version` (a stable string that Label Studio stores with each
    prediction; it changes only when a new model is published) and implement :meth:`predict`.
    """

    #: Stable version string reported to Label Studio, e.g. "grabcut-v1" or "sim-v0003".
    model_version: str = "unknown"

    @abc.abstractmethod
    def predict(self, image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Segment the object inside each box.

        Args:
            image: (H, W, 3) uint8 RGB.
            boxes: (N, 4) float XYXY in pixels; every box must pass :func:`check_boxes`
                (callers validate first and skip the others).
            labels: N class names, one per box (an engine may ignore them; an unknown label must not
                raise).

        Returns:
            masks: (N, H, W) float32 mask probabilities in [0, 1], zero outside the box.
            scores: (N,) float32 mask-quality scores in [0, 1] (SIM Eq. 11's S_k for SIM).

        Raises:
            BoxToMaskError: on a malformed image, boxes or labels (length mismatch).
        """

    def _check_inputs(self, image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """Shared validation for :meth:`predict`; returns boxes as (N, 4) float32 clipped to the image.

        Raises:
            BoxToMaskError: malformed image, boxes, a length mismatch, or a box that fails :func:`check_boxes`.
        """
        check_image(image)
        checks = check_boxes(boxes, image.shape[:2])
        if len(labels) != len(checks):
            raise BoxToMaskError(f"{len(checks)} boxes but {len(labels)} labels")
        bad = [f"box {i}: {c.reason}" for i, c in enumerate(checks) if not c.ok]
        if bad:
            raise BoxToMaskError("; ".join(bad))
        return np.stack([c.box for c in checks]).astype(np.float32) if checks else np.zeros((0, 4), np.float32)
