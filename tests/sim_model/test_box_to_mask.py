"""BoxToMask guards every engine (inputs and outputs), BoxMasks keeps masks box-local, and the shared
check-boxes → predict → skip helper."""
import numpy as np
import pytest

from sim_model.box_to_mask import DEADLINE_EXCEEDED, BoxMasks, BoxToMask, BoxToMaskError, predict_valid_boxes
from sim_model.boxes import box_pixel_bounds
from sim_model.engines.shape_prior import FilledBoxEngine

IMAGE = np.zeros((40, 60, 3), np.uint8)


class Echo(BoxToMask):
    """Records what reaches ``_predict`` and answers ``answer(boxes)``."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def _predict(self, image, boxes, labels):
        self.calls.append((boxes.copy(), list(labels)))
        return self.answer(boxes)


def _ones(boxes):
    crops = []
    for b in boxes:
        c0, r0, c1, r1 = box_pixel_bounds(b, IMAGE.shape[:2])
        crops.append(np.full((r1 - r0, c1 - c0), 0.75, np.float32))
    return crops, np.full(len(boxes), 0.5, np.float32)


def test_predict_validates_and_clips_before_the_engine_runs():
    e = Echo(_ones)
    masks = e.predict(IMAGE, np.array([[-5, 2.5, 10, 12], [50, 30, 70, 50]], np.float32), ["a", 3])
    boxes, labels = e.calls[0]
    np.testing.assert_array_equal(boxes, [[0, 2.5, 10, 12], [50, 30, 60, 40]])  # clipped to the image
    assert labels == ["a", "3"]
    assert masks.bounds.tolist() == [[0, 2, 10, 12], [50, 30, 60, 40]]
    for bad, match in (([[5, 5, 5, 9]], "zero area"), ([[70, 0, 80, 9]], "outside"), ([[np.nan, 0, 5, 5]], "non-finite")):
        with pytest.raises(BoxToMaskError, match=match):
            e.predict(IMAGE, np.array(bad, np.float32), ["a"])
    with pytest.raises(BoxToMaskError, match="labels"):
        e.predict(IMAGE, np.array([[1, 1, 5, 5]], np.float32), [])
    with pytest.raises(BoxToMaskError, match="uint8"):
        e.predict(IMAGE.astype(np.float32), np.array([[1, 1, 5, 5]], np.float32), ["a"])
    assert len(e.calls) == 1  # none of the bad calls reached the engine
    assert len(e.predict(IMAGE, np.zeros((0, 4)), [])) == 0 and len(e.calls) == 1


@pytest.mark.parametrize("answer, match", [
    (lambda b: ([np.ones((3, 3), np.float32)], np.ones(1, np.float32)), "covers"),
    (lambda b: ([], np.ones(1, np.float32)), "0 masks"),
    (lambda b: (_ones(b)[0], np.ones(2, np.float32)), "2 scores"),
    (lambda b: ([c * 2 for c in _ones(b)[0]], np.ones(1, np.float32)), "outside \\[0, 1\\]"),
    (lambda b: (_ones(b)[0], np.array([np.nan], np.float32)), "scores outside"),
])
def test_broken_engine_output_is_refused(answer, match):
    with pytest.raises(BoxToMaskError, match=match):
        Echo(answer).predict(IMAGE, np.array([[10, 10, 20, 25]], np.float32), ["a"])


def test_box_masks_paste_select_and_threshold():
    masks = Echo(_ones).predict(IMAGE, np.array([[10, 10, 20, 25], [0, 0, 60, 40]], np.float32), ["a", "b"])
    full = masks.full(0)
    assert full.shape == (40, 60) and full[10:25, 10:20].min() == 0.75 and full.sum() == pytest.approx(0.75 * 150)
    dense = masks.dense()
    assert dense.shape == (2, 40, 60) and np.array_equal(dense[0], full)
    assert masks.foreground(0, 0.8).sum() == 0 and masks.foreground(0, 0.7).all()
    second = masks.select([1])
    assert len(second) == 1 and second.bounds.tolist() == [[0, 0, 60, 40]] and second.scores.tolist() == [0.5]
    assert len(BoxMasks.empty((4, 5))) == 0 and BoxMasks.empty((4, 5)).dense().shape == (0, 4, 5)


def test_predict_valid_boxes_skips_with_reasons_and_keeps_order():
    e = Echo(_ones)
    boxes = np.array([[10, 10, 20, 25], [5, 5, 5, 9], [30, 0, 40, 10], [np.nan] * 4])
    pred = predict_valid_boxes(e, IMAGE, boxes, ["a", "b", "c", "d"])
    assert pred.kept == [0, 2] and [i for i, _ in pred.skipped] == [1, 3]
    assert "zero area" in pred.skipped[0][1] and "non-finite" in pred.skipped[1][1]
    assert len(e.calls) == 1 and e.calls[0][1] == ["a", "c"]  # one engine call for the valid boxes
    assert pred.masks.bounds.tolist() == [[10, 10, 20, 25], [30, 0, 40, 10]]
    none = predict_valid_boxes(e, IMAGE, boxes[[1, 3]], ["b", "d"])
    assert none.kept == [] and len(none.masks) == 0 and len(e.calls) == 1
    with pytest.raises(BoxToMaskError, match="labels"):
        predict_valid_boxes(e, IMAGE, boxes, ["a"])


def test_under_a_deadline_the_boxes_go_in_shrinking_chunks_and_the_rest_are_marked():
    """A slow engine (0.05 s per box, 40 boxes) under a 0.5-s deadline: a first box alone (no pace known),
    then chunks of at most half the time left, the answer by the deadline plus about one box, the boxes
    not reached skipped as DEADLINE_EXCEEDED; with a known pace and time enough, one call."""
    import time

    def slow(boxes):
        time.sleep(0.05 * len(boxes))
        return _ones(boxes)

    e = Echo(slow)
    boxes = np.array([[1 + i, 1, 20 + i, 30] for i in range(40)], np.float64)
    t0 = time.monotonic()
    pred = predict_valid_boxes(e, IMAGE, boxes, ["a"] * 40, deadline=t0 + 0.5)
    took = time.monotonic() - t0
    sizes = [len(c[1]) for c in e.calls]
    assert sizes[0] == 1 and 1 < len(sizes) and sum(sizes) == len(pred.kept) < 40
    assert took < 0.5 + 0.05 + 0.04, took  # the deadline plus one box (and some scheduling)
    assert [i for i, r in pred.skipped if r == DEADLINE_EXCEEDED] == list(range(len(pred.kept), 40))
    assert pred.masks.bounds.tolist() == [list(box_pixel_bounds(b, IMAGE.shape[:2])) for b in boxes[pred.kept]]
    assert e.seconds_per_box == pytest.approx(0.05, abs=0.02)
    e.calls.clear()
    whole = predict_valid_boxes(e, IMAGE, boxes[:5], ["a"] * 5, deadline=time.monotonic() + 10)
    assert [len(c[1]) for c in e.calls] == [5] and whole.kept == [0, 1, 2, 3, 4] and whole.skipped == []


def test_memory_grows_with_box_area_not_with_image_size():
    """1 000 boxes on a 49-megapixel image: the masks hold the boxes' pixels only."""
    big = np.zeros((7000, 7000, 3), np.uint8)
    xy = np.random.default_rng(0).uniform(0, 6900, (1000, 2))
    boxes = np.concatenate([xy, xy + 20], axis=1).astype(np.float32)
    masks = FilledBoxEngine().predict(big, boxes, ["x"] * 1000)
    held = sum(c.nbytes for c in masks.crops)
    assert held == 1000 * 20 * 20 * 4 or held <= 1000 * 21 * 21 * 4
    assert held < 0.01 * 1000 * 7000 * 7000  # a full-image mask per box would be 196 GB
