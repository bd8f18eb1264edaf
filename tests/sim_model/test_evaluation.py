"""Tests of the one box→mask evaluation (sim_model.evaluation) and the benchmark's results file,
on the real coco-mini val2017 images and annotations."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

import torch

from sim_model.box_to_mask import BoxMasks, BoxToMask, BoxToMaskError
from sim_model.boxes import box_masks, box_pixel_bounds, xywh_to_xyxy
from sim_model.datasets import coco_mini_dir, split_files
from sim_model.engines.shape_prior import EllipseEngine, FilledBoxEngine, ellipse_mask
from sim_model.evaluation import box_mask_iou, box_mask_overlap, evaluate_box_to_mask, mask_iou, overlap_figures
from sim_model.results import record_results, render_markdown

DATA = coco_mini_dir()
VAL_JSON, VAL_IMAGES = split_files(DATA, "val2017")
pytestmark = pytest.mark.skipif(not VAL_JSON.exists(), reason=f"coco-mini not found at {DATA}")


@pytest.fixture(scope="module")
def coco():
    return COCO(str(VAL_JSON))


class GroundTruthEngine(BoxToMask):
    """Returns each box's own ground-truth mask (looked up by its box), score 1: the ceiling."""

    model_version = "ground-truth"

    def __init__(self, coco: COCO):
        self.by_box = {}
        for a in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            self.by_box[tuple(np.round(xywh_to_xyxy(a["bbox"]), 2))] = coco.annToMask(a).astype(np.float32)

    def _predict(self, image, boxes, labels):
        crops = []
        for b in boxes:
            c0, r0, c1, r1 = box_pixel_bounds(b, image.shape[:2])
            crops.append(self.by_box[tuple(np.round(np.asarray(b, np.float32), 2))][r0:r1, c0:c1])
        return crops, np.ones(len(boxes), np.float32)


def _readme_floor() -> dict[str, float]:
    """The filled-box reference figures that coco-mini's README documents for val2017."""
    text = (DATA / "README.md").read_text()
    m = re.search(r"val2017 mask AP ([0-9.]+) / AP50 ([0-9.]+), mean IoU\(box, mask\) ([0-9.]+)", text)
    assert m, "coco-mini README no longer states the val2017 filled-box floor"
    return {"AP": float(m.group(1)) * 100, "AP50": float(m.group(2)) * 100, "mIoU": float(m.group(3))}


def test_ground_truth_masks_score_perfectly(coco):
    res = evaluate_box_to_mask(GroundTruthEngine(coco), VAL_JSON, VAL_IMAGES, progress=False)
    n_noncrowd = len(coco.getAnnIds(iscrowd=False))
    assert res["n_boxes"] == n_noncrowd
    assert res["n_small"] + res["n_medium"] + res["n_large"] == n_noncrowd
    assert res["mIoU"] == pytest.approx(1.0)
    assert res["mask_precision"] == res["mask_recall"] == res["area_ratio"] == pytest.approx(1.0)
    for size in ("small", "medium", "large"):
        assert res[f"mIoU_{size}"] == pytest.approx(1.0)
    assert res["AP"] == pytest.approx(100.0, abs=1e-6)
    assert res["AP50"] == pytest.approx(100.0, abs=1e-6)
    assert res["AP75"] == pytest.approx(100.0, abs=1e-6)
    assert res["skipped"] == []


def test_filled_box_gives_the_documented_floor():
    floor = _readme_floor()
    res = evaluate_box_to_mask(FilledBoxEngine(), VAL_JSON, VAL_IMAGES, progress=False)
    assert res["mIoU"] == pytest.approx(floor["mIoU"], abs=0.01)
    assert res["AP"] == pytest.approx(floor["AP"], abs=0.5)
    assert res["AP50"] == pytest.approx(floor["AP50"], abs=1.0)
    assert res["ms_per_box"] > 0 and res["ms_per_image"] >= res["ms_per_box"]
    # the filled box holds the whole object: it bleeds (ratio > 1), never shrinks; its IoU is its precision
    assert res["mask_recall"] > 0.97 and res["area_ratio"] > 1.2
    assert res["mask_precision"] == pytest.approx(res["mIoU"], abs=0.03)


def test_ellipse_beats_filled_box_and_max_images_limits(coco):
    box = evaluate_box_to_mask(FilledBoxEngine(), VAL_JSON, VAL_IMAGES, max_images=10, progress=False)
    ell = evaluate_box_to_mask(EllipseEngine(), VAL_JSON, VAL_IMAGES, max_images=10, progress=False)
    first10 = sorted(coco.getImgIds())[:10]
    assert box["n_images"] == 10
    assert box["n_boxes"] == len(coco.getAnnIds(imgIds=first10, iscrowd=False))
    assert ell["mIoU"] > box["mIoU"]


def test_engine_with_wrong_output_shape_is_reported():
    class Broken(BoxToMask):
        def _predict(self, image, boxes, labels):
            return [np.zeros((2, 2), np.float32)] * len(boxes), np.ones(len(boxes), np.float32)

    with pytest.raises(BoxToMaskError, match="engine returned mask 0 of shape"):
        evaluate_box_to_mask(Broken(), VAL_JSON, VAL_IMAGES, max_images=1, progress=False)


def test_missing_image_raises_or_is_skipped(coco, tmp_path: Path):
    first3 = sorted(coco.getImgIds())[:3]
    for info in coco.loadImgs(first3[:2]):  # the third image is missing from the folder
        (tmp_path / info["file_name"]).symlink_to(VAL_IMAGES / info["file_name"])
    with pytest.raises(FileNotFoundError, match="cannot read image"):
        evaluate_box_to_mask(FilledBoxEngine(), VAL_JSON, tmp_path, max_images=3, progress=False)
    res = evaluate_box_to_mask(FilledBoxEngine(), VAL_JSON, tmp_path, max_images=3, progress=False,
                               missing_images="skip")
    assert [s["image_id"] for s in res["skipped_images"]] == [first3[2]]
    assert res["n_images"] == 2
    assert res["n_boxes"] == len(coco.getAnnIds(imgIds=first3[:2], iscrowd=False))
    two = evaluate_box_to_mask(FilledBoxEngine(), VAL_JSON, VAL_IMAGES, max_images=2, progress=False)
    assert res["mIoU"] == pytest.approx(two["mIoU"]) and res["AP"] == pytest.approx(two["AP"])


def test_mask_iou_and_rasterisers_on_synthetic_masks():
    a, b = box_masks(torch.tensor([[0, 0, 4, 10], [2, 0, 6, 10]]), 10, 10).numpy()
    assert a.sum() == 40 and mask_iou(a, b) == pytest.approx(20 / 60)
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert box_pixel_bounds([3.2, 3.2, 3.6, 3.7], (10, 10)) == (3, 3, 4, 4)  # a sub-pixel box covers one pixel
    e = ellipse_mask((100, 100), np.array([0, 0, 100, 100]))
    assert abs(e.sum() - np.pi * 50 ** 2) < 100 and not e[0, 0]
    assert ellipse_mask((10, 10), np.array([3.2, 3.2, 3.6, 3.7])).sum() == 1


def test_box_local_iou_equals_full_image_iou():
    """IoU computed on the box's crop equals IoU of the pasted mask, also when the ground truth leaves the box."""
    gt = np.zeros((40, 50), bool)
    gt[5:30, 10:45] = True
    crop = np.zeros((20, 20), np.float32)
    crop[5:20, 2:15] = 0.8
    crop[0, 0] = 0.2  # below the threshold
    masks = BoxMasks((40, 50), np.array([[8, 10, 28, 30]]), (crop,), np.ones(1, np.float32))
    assert box_mask_iou(masks, 0, gt, 0.5) == pytest.approx(mask_iou(masks.full(0) >= 0.5, gt))
    assert box_mask_iou(masks, 0, gt, 0.5) < 0.5


def test_overlap_figures_on_synthetic_counts():
    """Precision over boxes with a prediction, recall over boxes with a ground truth, the median area ratio."""
    gt = np.zeros((40, 50), bool)
    gt[10:20, 10:30] = True  # 200 pixels
    crop = np.zeros((20, 20), np.float32)
    crop[:10, :10] = 1.0  # 100 pixels at rows 10-19, columns 10-19: all inside gt
    masks = BoxMasks((40, 50), np.array([[10, 10, 30, 30]]), (crop,), np.ones(1, np.float32))
    assert box_mask_overlap(masks, 0, gt, 0.5) == (100, 100, 200)
    boxes = [{"inter_pixels": 100, "pred_pixels": 100, "gt_pixels": 200},  # shrunk: precision 1, recall 0.5
             {"inter_pixels": 50, "pred_pixels": 200, "gt_pixels": 50},  # bled: precision 0.25, recall 1
             {"inter_pixels": 0, "pred_pixels": 0, "gt_pixels": 80}]  # empty prediction: recall 0, no precision
    f = overlap_figures(boxes)
    assert f["mask_precision"] == pytest.approx((1.0 + 0.25) / 2)
    assert f["mask_recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert f["area_ratio"] == pytest.approx(0.5)  # median of 0.5, 4, 0
    assert np.isnan(overlap_figures([])["mask_precision"])


def test_record_results_merges_rows_and_renders_markdown(tmp_path: Path):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    js.write_text(json.dumps({"_notes": "keep me", "coco-mini-val2017": {
        "box": {"mIoU": 0.5, "AP": 20.0, "command": "old", "machine": "m"}}}))
    record_results("coco-mini-val2017", "grabcut", {"mIoU": 0.71234567, "AP": 45.0, "ms_per_box": float("nan")},
                   "python -m sim_model.benchmark --engines grabcut", machine="test box", json_path=js, md_path=md)
    record_results("coco-mini-val2017", "sim_full", {"mIoU": 0.8, "AP": 50.0, "train_step_s": 1.25},
                   "python -m training.evaluate", machine="gpu", json_path=js, md_path=md)
    data = json.loads(js.read_text())
    rows = data["coco-mini-val2017"]
    assert set(rows) == {"box", "grabcut", "sim_full"}
    assert rows["grabcut"]["mIoU"] == 0.7123 and rows["grabcut"]["ms_per_box"] is None
    assert rows["grabcut"]["command"] == "python -m sim_model.benchmark --engines grabcut"
    assert data["_notes"] == "keep me"
    text = md.read_text()
    assert text == render_markdown(data)
    assert "python -m training.evaluate" in text and "train_step_s=1.25" in text and "keep me" in text
    assert "| `grabcut` | 0.712 |" in text and "percent (0–100)" in text
    assert not os.path.exists(str(js) + ".tmp")


def test_an_image_with_125_nuclei_counts_every_mask():
    """COCOeval's default maxDets=100 would cap recall at 100/125 (the dataset README's AP 0.802)."""
    root = DATA.parent / "stardist-nuclei2d"
    if not root.exists():
        pytest.skip(f"stardist-nuclei2d not found at {root}")
    json_file = root / "annotations" / "instances_stardist2d.json"
    res = evaluate_box_to_mask(GroundTruthEngine(COCO(str(json_file))), json_file, root, progress=False)
    assert res["n_boxes"] == 125 and res["AP"] == pytest.approx(100.0, abs=1e-6)
