"""Tests of the cold-start GrabCut engine on real coco-mini val2017 images and boxes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from sim_model.box_to_mask import BoxToMaskError
from sim_model.benchmark import default_data_dir
from sim_model.engines.grabcut import GrabCutBoxToMask
from sim_model.engines.shape_prior import FilledBoxEngine, box_mask, ellipse_mask
from sim_model.evaluation import evaluate_box_to_mask

DATA = default_data_dir()
VAL_JSON = DATA / "val2017" / "annotations" / "instances_val2017.json"
VAL_IMAGES = DATA / "val2017" / "images"
pytestmark = pytest.mark.skipif(not VAL_JSON.exists(), reason=f"coco-mini not found at {DATA}")
N_IMAGES = 8  # the first 8 val2017 images by id: 66 non-crowd boxes, ~10 s


@pytest.fixture(scope="module")
def subset_results():
    grabcut = evaluate_box_to_mask(GrabCutBoxToMask(), VAL_JSON, VAL_IMAGES, max_images=N_IMAGES, progress=False)
    box = evaluate_box_to_mask(FilledBoxEngine(), VAL_JSON, VAL_IMAGES, max_images=N_IMAGES, progress=False)
    return grabcut, box


@pytest.fixture(scope="module")
def image():
    bgr = cv2.imread(str(sorted(VAL_IMAGES.glob("*.jpg"))[0]))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_grabcut_beats_filled_box_on_real_boxes(subset_results):
    grabcut, box = subset_results
    assert grabcut["n_boxes"] == box["n_boxes"] > 50
    # Measured on these 66 boxes: 0.711 vs 0.599 (paired standard error of the gap ~0.014).
    assert grabcut["mIoU"] > box["mIoU"] + 0.05
    for size in ("small", "medium", "large"):
        if grabcut[f"n_{size}"] >= 10:
            assert grabcut[f"mIoU_{size}"] > box[f"mIoU_{size}"]
    # Measured: segm AP 57.1 vs 32.4.
    assert grabcut["AP"] > box["AP"] + 10


def test_grabcut_score_ranks_masks(subset_results):
    grabcut, _ = subset_results
    per_box = sorted(grabcut["per_box"], key=lambda p: p["score"])
    half = len(per_box) // 2
    low = np.mean([p["iou"] for p in per_box[:half]])
    high = np.mean([p["iou"] for p in per_box[half:]])
    # Measured: 0.62 (low-score half) vs 0.80 (high-score half).
    assert high > low + 0.03
    assert all(0.0 <= p["score"] <= 1.0 for p in per_box)


def test_masks_are_soft_in_range_and_zero_outside_the_box(image):
    h, w = image.shape[:2]
    boxes = np.array([[10.3, 20.7, 200.2, 180.9], [w - 60.5, h - 50.2, w, h], [0, 0, w, h]], np.float32)
    masks, scores = GrabCutBoxToMask().predict(image, boxes, ["a", "b", "no-such-label"])
    assert masks.shape == (3, h, w) and masks.dtype == np.float32
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert np.all((masks >= 0) & (masks <= 1)) and np.all((scores >= 0) & (scores <= 1))
    for m, b in zip(masks, boxes):
        inside = box_mask((h, w), b)
        assert not m[~inside].any()
        assert (m[inside] >= 0.5).mean() >= 0.1  # never empty: GrabCut or the ellipse fallback


def test_degenerate_boxes(image):
    h, w = image.shape[:2]
    engine = GrabCutBoxToMask()
    # tiny (2x2 px), 1 px wide, and touching the image corner: all give a non-empty mask inside the box
    boxes = np.array([[50, 50, 52, 52], [100, 40, 101, 90], [w - 3, h - 3, w + 5, h + 5]], np.float32)
    masks, scores = engine.predict(image, boxes, ["x"] * 3)
    for m, b in zip(masks, np.minimum(boxes, [w, h, w, h])):
        fg = m >= 0.5
        assert fg.any() and not (fg & ~box_mask((h, w), b)).any()
    assert (masks[1] >= 0.5).any(axis=0).sum() == 1  # the 1-px-wide box gives one column
    # boxes that check_boxes rejects raise a clear error
    for bad in ([100, 40, 100.5, 90], [10, 10, 10, 30], [w + 1, 0, w + 9, 9], [np.nan, 0, 5, 5]):
        with pytest.raises(BoxToMaskError, match="box 0"):
            engine.predict(image, np.array([bad], np.float32), ["x"])
    with pytest.raises(BoxToMaskError, match="labels"):
        engine.predict(image, boxes, ["x"])
    empty_masks, empty_scores = engine.predict(image, np.zeros((0, 4), np.float32), [])
    assert empty_masks.shape == (0, h, w) and empty_scores.shape == (0,)


@pytest.mark.timeout(20)  # a single-colour crop used to stall cv2.grabCut for ~30 s
def test_uniform_image_gives_a_mask_inside_the_box():
    flat = np.full((120, 160, 3), 128, np.uint8)
    box = np.array([[20, 30, 120, 90]], np.float32)
    masks, scores = GrabCutBoxToMask().predict(flat, box, ["x"])
    fg = masks[0] >= 0.5
    # nothing to separate: GrabCut keeps most of the box, or the ellipse fallback covers >= 25% of it
    assert fg.sum() >= 0.25 * 100 * 60 and not (fg & ~box_mask((120, 160), box[0])).any()
    assert 0 < scores[0] <= 1


def test_fallback_is_the_inscribed_ellipse_with_a_lower_score(image):
    box = np.array([[40.0, 60.0, 240.0, 200.0]], np.float32)
    forced, s_forced = GrabCutBoxToMask(min_fill=1.01, fallback_score_factor=0.5).predict(image, box, ["x"])
    assert np.array_equal(forced[0] >= 0.5, ellipse_mask(image.shape[:2], box[0]))
    assert s_forced[0] == pytest.approx(0.5)  # the ellipse spans every row and column of its box


def test_same_input_gives_the_same_masks(image):
    boxes = np.array([[40.0, 60.0, 240.0, 200.0], [300.0, 100.0, 420.0, 300.0]], np.float32)
    engine = GrabCutBoxToMask()
    m1, s1 = engine.predict(image, boxes, ["x", "y"])
    cv2.kmeans(np.random.rand(50, 2).astype(np.float32), 3, None,  # advance OpenCV's RNG in between
               (cv2.TERM_CRITERIA_MAX_ITER, 3, 0), 1, cv2.KMEANS_RANDOM_CENTERS)
    m2, s2 = engine.predict(image, boxes[::-1].copy(), ["y", "x"])
    assert np.array_equal(m1, m2[::-1]) and np.array_equal(s1, s2[::-1])


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        GrabCutBoxToMask(init="circle")
    with pytest.raises(ValueError):
        GrabCutBoxToMask(iterations=0)
