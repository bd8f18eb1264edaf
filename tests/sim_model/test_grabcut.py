"""Tests of the cold-start GrabCut engine on real coco-mini val2017 images and boxes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from sim_model.box_to_mask import BoxToMaskError
from sim_model.boxes import box_pixel_bounds
from sim_model.datasets import coco_mini_dir, split_files
from sim_model.engines.grabcut import GrabCutBoxToMask
from sim_model.engines.shape_prior import FilledBoxEngine, ellipse_mask
from sim_model.evaluation import evaluate_box_to_mask

DATA = coco_mini_dir()
VAL_JSON, VAL_IMAGES = split_files(DATA, "val2017")
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


def test_masks_are_soft_in_range_and_local_to_the_box(image):
    h, w = image.shape[:2]
    boxes = np.array([[10.3, 20.7, 200.2, 180.9], [w - 60.5, h - 50.2, w, h], [0, 0, w, h]], np.float32)
    masks = GrabCutBoxToMask().predict(image, boxes, ["a", "b", "no-such-label"])
    assert len(masks) == 3 and masks.image_size == (h, w)
    assert masks.scores.shape == (3,) and masks.scores.dtype == np.float32
    assert np.all((masks.scores >= 0) & (masks.scores <= 1))
    for crop, bounds, b in zip(masks.crops, masks.bounds, boxes):
        c0, r0, c1, r1 = box_pixel_bounds(b, (h, w))
        assert tuple(bounds) == (c0, r0, c1, r1) and crop.shape == (r1 - r0, c1 - c0) and crop.dtype == np.float32
        assert np.all((crop >= 0) & (crop <= 1))
        assert (crop >= 0.5).mean() >= 0.1  # never empty: GrabCut or the ellipse fallback


def test_degenerate_boxes(image):
    h, w = image.shape[:2]
    engine = GrabCutBoxToMask()
    # tiny (2x2 px), 1 px wide, and touching the image corner: all give a non-empty mask inside the box
    boxes = np.array([[50, 50, 52, 52], [100, 40, 101, 90], [w - 3, h - 3, w + 5, h + 5]], np.float32)
    masks = engine.predict(image, boxes, ["x"] * 3)
    for k in range(3):
        assert masks.foreground(k, 0.5).any()
    assert masks.crops[1].shape == (50, 1)  # the 1-px-wide box gives one column
    assert tuple(masks.bounds[2]) == (w - 3, h - 3, w, h)  # clipped to the image
    # boxes that check_boxes rejects raise a clear error
    for bad in ([100, 40, 100.5, 90], [10, 10, 10, 30], [w + 1, 0, w + 9, 9], [np.nan, 0, 5, 5]):
        with pytest.raises(BoxToMaskError, match="box 0"):
            engine.predict(image, np.array([bad], np.float32), ["x"])
    with pytest.raises(BoxToMaskError, match="labels"):
        engine.predict(image, boxes, ["x"])
    empty = engine.predict(image, np.zeros((0, 4), np.float32), [])
    assert len(empty) == 0 and empty.dense().shape == (0, h, w) and empty.scores.shape == (0,)


@pytest.mark.timeout(20)  # a single-colour crop used to stall cv2.grabCut for ~30 s
def test_uniform_image_gives_a_mask_inside_the_box():
    flat = np.full((120, 160, 3), 128, np.uint8)
    box = np.array([[20, 30, 120, 90]], np.float32)
    masks = GrabCutBoxToMask().predict(flat, box, ["x"])
    # nothing to separate: GrabCut keeps most of the box, or the ellipse fallback covers >= 25% of it
    assert masks.foreground(0, 0.5).sum() >= 0.25 * 100 * 60
    assert 0 < masks.scores[0] <= 1


def test_fallback_is_the_inscribed_ellipse_with_a_lower_score(image):
    box = np.array([[40.0, 60.0, 240.0, 200.0]], np.float32)
    forced = GrabCutBoxToMask(min_fill=1.01, fallback_score_factor=0.5).predict(image, box, ["x"])
    assert np.array_equal(forced.foreground(0, 0.5), ellipse_mask(image.shape[:2], box[0]))
    assert forced.scores[0] == pytest.approx(0.5)  # the ellipse spans every row and column of its box


def test_same_input_gives_the_same_masks(image):
    boxes = np.array([[40.0, 60.0, 240.0, 200.0], [300.0, 100.0, 420.0, 300.0]], np.float32)
    engine = GrabCutBoxToMask()
    a = engine.predict(image, boxes, ["x", "y"])
    cv2.kmeans(np.random.rand(50, 2).astype(np.float32), 3, None,  # advance OpenCV's RNG in between
               (cv2.TERM_CRITERIA_MAX_ITER, 3, 0), 1, cv2.KMEANS_RANDOM_CENTERS)
    b = engine.predict(image, boxes[::-1].copy(), ["y", "x"])
    assert np.array_equal(a.dense(), b.dense()[::-1]) and np.array_equal(a.scores, b.scores[::-1])


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        GrabCutBoxToMask(init="circle")
    with pytest.raises(ValueError):
        GrabCutBoxToMask(iterations=0)
