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


def test_the_vote_weighs_the_map_against_grabcut_and_the_refined_mask(sim_version_dir):
    from sim_model.engines import cold_start_engine
    from sim_model.engines.sim import SIMBoxToMask

    image, truth, box = _scene(2)
    c0, r0, c1, r1 = box_pixel_bounds(box, image.shape[:2])
    # a map that is sure of the object's core, hesitant at its rim and wrongly sure of one corner
    prior = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 4)[r0:r1, c0:c1]
    prior[:20, :20] = 1.0
    grabcut = cold_start_engine().segment_box(image, box)[0]
    vote = SIMBoxToMask.from_version_dir(sim_version_dir, vote=True, refine=False, map_weight=0.65)
    out = vote._colour_steps(image, box, prior)
    np.testing.assert_allclose(out, 0.65 * prior + 0.35 * grabcut, atol=1e-6)
    # where the two disagree, the map wins only where it is sure: GrabCut's background under the wrongly
    # sure corner becomes foreground, GrabCut's foreground under a hesitant map (>= 0.23) stays
    corner = (grabcut[:20, :20] < 0.5)
    assert corner.any() and (out[:20, :20][corner] >= 0.5).all()
    hesitant = (grabcut >= 1.0) & (prior >= 0.25) & (prior < 0.5)
    assert hesitant.any() and (out[hesitant] >= 0.5).all()
    # through predict, GrabCut runs in the engine's worker thread alongside the network: the same vote
    plain = SIMBoxToMask.from_version_dir(sim_version_dir, vote=False, refine=False)
    label = plain.class_names[0]
    learned = plain.predict(image, box[None], [label]).crops[0]
    np.testing.assert_allclose(vote.predict(image, box[None], [label]).crops[0], 0.65 * learned + 0.35 * grabcut,
                               atol=1e-5)
    # a GrabCut that fails in the worker thread fails the call (nothing is served half-voted)
    def broken(*args):
        raise RuntimeError("GrabCut broke")

    vote.voter.segment_box = broken
    with pytest.raises(RuntimeError, match="GrabCut broke"):
        vote.predict(image, np.stack([box, box]), [label, label])
    both = SIMBoxToMask.from_version_dir(sim_version_dir, vote=True, refine=True, map_weight=0.5)
    refined = both.refiner.refine(image, box, prior, both.refine_low, both.refine_high)
    assert refined is not None
    np.testing.assert_allclose(both._colour_steps(image, box, prior), 0.5 * prior + 0.25 * (grabcut + refined),
                               atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        SIMBoxToMask.from_version_dir(sim_version_dir, vote=True, map_weight=1.5)
