"""GrabCut seeded from a learned probability map (the SIM engine's refinement), on synthetic images."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from sim_model.boxes import box_pixel_bounds, mask_boxes
from sim_model.engines.grabcut import GrabCutBoxToMask


def _scene(seed: int = 0):
    """A noisy two-tone background with an irregular red object; its true mask and tight box."""
    rng = np.random.default_rng(seed)
    h, w = 240, 320
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (60, 140, 60)
    image[:, w // 2:] = (70, 70, 160)
    truth = np.zeros((h, w), np.uint8)
    cv2.ellipse(truth, (150, 120), (70, 45), 20, 0, 360, 1, -1)
    cv2.circle(truth, (205, 95), 28, 1, -1)
    image[truth > 0] = (200, 40, 40)
    image = np.clip(image.astype(np.int16) + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    box = mask_boxes(truth[None].astype(bool))[0].numpy().astype(np.float32)
    return image, truth.astype(bool), box


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_refinement_sharpens_a_shrunken_blurry_prior():
    image, truth, box = _scene()
    c0, r0, c1, r1 = box_pixel_bounds(box, image.shape[:2])
    inner = cv2.erode(truth.astype(np.uint8), np.ones((25, 25), np.uint8))  # a prior that shrank
    prior = cv2.GaussianBlur(inner.astype(np.float32), (0, 0), 6)[r0:r1, c0:c1]
    prior = np.clip(prior * 0.95 + 0.02, 0, 1)
    refined = GrabCutBoxToMask(iterations=2).refine(image, box, prior, 0.0, 0.9)
    assert refined is not None and refined.shape == prior.shape
    full = np.zeros_like(truth)
    full[r0:r1, c0:c1] = refined >= 0.5
    before = np.zeros_like(truth)
    before[r0:r1, c0:c1] = prior >= 0.5
    assert _iou(before, truth) < 0.75 and _iou(full, truth) > 0.95
    # certain background inside the box where the shrunken map is low forbids the true boundary
    # (the reason TEST.REFINE.THRESH_LOW defaults to 0)
    forbidden = GrabCutBoxToMask(iterations=2).refine(image, box, prior, 0.1, 0.9)
    full[r0:r1, c0:c1] = (forbidden if forbidden is not None else prior) >= 0.5
    assert _iou(full, truth) < 0.75


def test_sure_foreground_of_the_prior_is_kept_and_nothing_leaves_the_box():
    image, truth, box = _scene(1)
    c0, r0, c1, r1 = box_pixel_bounds(box, image.shape[:2])
    prior = truth[r0:r1, c0:c1].astype(np.float32)
    refined = GrabCutBoxToMask(iterations=2).refine(image, box, prior, 0.0, 0.9)
    assert refined.shape == (r1 - r0, c1 - c0)
    assert (refined[prior >= 0.9] >= 0.5).mean() > 0.97  # certain foreground stays foreground (up to resizing)


def test_a_prior_without_foreground_keeps_the_map_and_bad_arguments_raise():
    image, truth, box = _scene()
    c0, r0, c1, r1 = box_pixel_bounds(box, image.shape[:2])
    engine = GrabCutBoxToMask()
    assert engine.refine(image, box, np.zeros((r1 - r0, c1 - c0), np.float32), 0.1, 0.9) is None
    with pytest.raises(ValueError, match="prior"):
        engine.refine(image, box, np.zeros((3, 3), np.float32), 0.1, 0.9)
    with pytest.raises(ValueError, match="thresh"):
        engine.refine(image, box, np.zeros((r1 - r0, c1 - c0), np.float32), 0.6, 0.9)
