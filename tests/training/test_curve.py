"""The learning-curve benchmark's data side (training.curve): splits and the subsets it trains on."""
from __future__ import annotations

import json

import pytest

from sim_model.datasets import shared_data_dir
from training.coco import MASK_SUPERVISED_KEY
from training.curve import dataset_splits, subset_json

BALLOON = shared_data_dir() / "balloon"
pytestmark = pytest.mark.skipif(not BALLOON.is_dir(), reason=f"balloon not found at {BALLOON}")


def test_subsets_take_a_seeded_share_of_the_images_and_mark_exactly_n_masks(tmp_path):
    train, val = dataset_splits(BALLOON)
    assert (train.name, val.name) == ("train", "val")
    counts = subset_json(train.json, tmp_path / "half.json", 0.5, n_masks=5, seed=0)
    data = json.loads((tmp_path / "half.json").read_text())
    assert counts == {"images": 31, "boxes": len(data["annotations"]), "masks": 5}
    marked = [a for a in data["annotations"] if a.get(MASK_SUPERVISED_KEY)]
    assert len(marked) == 5 and all(a["segmentation"] for a in marked)
    assert not any("segmentation" in a for a in data["annotations"] if not a.get(MASK_SUPERVISED_KEY))
    ids = {i["id"] for i in data["images"]}
    assert all(a["image_id"] in ids for a in data["annotations"])
    subset_json(train.json, tmp_path / "again.json", 0.5, n_masks=5, seed=0)
    assert json.loads((tmp_path / "again.json").read_text()) == data  # seeded: the same subset
    boxes_only = subset_json(train.json, tmp_path / "all.json", 1.0)
    assert boxes_only["images"] == 61 and boxes_only["masks"] == 0
    with pytest.raises(ValueError):
        subset_json(train.json, tmp_path / "x.json", 0.1, n_masks=10_000)
    with pytest.raises(ValueError):
        subset_json(train.json, tmp_path / "x.json", 0.0)


def test_recorded_rows_give_back_the_points_the_plot_draws():
    from training.curve import FIGURES, recorded_points

    def figs(miou):
        return {"mIoU": miou, "AP": 10.0 * miou, "ms_per_box": 40.0}

    meta = {"train_minutes_cpu": 30.0, "n_train_images": 61, "n_train_boxes": 255}
    table = {"grabcut": figs(0.9), "learned": {**figs(0.93), **meta, "iterations": 800, "n_masks": 0},
             "learned_map@200": {**figs(0.8), **meta, "iterations": 200, "n_masks": 0, "engine": "map"},
             "learned_refine+vote@200": {**figs(0.85), **meta, "iterations": 200, "n_masks": 0},
             "learned_map@1200": {**figs(0.82), **meta, "iterations": 1200, "n_masks": 0},
             "learned_whole@1200": {**figs(0.7), **meta, "iterations": 1200, "n_masks": 0},
             "learned_vote_f26": {**figs(0.91), **meta, "iterations": 600, "n_train_images": 16, "n_masks": 0},
             "learned_vote_m100": {**figs(0.92), **meta, "iterations": 600, "n_masks": 100},
             "learned_vote_m25": {**figs(0.90), **meta, "iterations": 600, "n_masks": 25},
             "learned_map_m25": {**figs(0.88), **meta, "iterations": 600, "n_masks": 25}}
    curve, fractions, masks = recorded_points(table)
    assert [q["iterations"] for q in curve] == [200, 1200]
    assert set(curve[0]) - set(meta) == {"iterations", "n_masks", "map", "refine+vote"}
    assert curve[0]["refine+vote"] == figs(0.85) and set(curve[0]["map"]) <= set(FIGURES)
    assert curve[1]["whole"]["mIoU"] == 0.7
    assert [q["n_train_images"] for q in fractions] == [16] and fractions[0]["vote"]["mIoU"] == 0.91
    assert [q["n_masks"] for q in masks] == [25, 100]
    assert masks[0]["map"]["mIoU"] == 0.88 and masks[0]["vote"]["mIoU"] == 0.90 and "map" not in masks[1]
    # the full run at the fraction and mask runs' 600 iterations is their 100 % and 0-mask point
    table["learned_vote@600"] = {**figs(0.915), **meta, "iterations": 600, "n_masks": 0}
    curve, fractions, masks = recorded_points(table)
    assert [q["n_train_images"] for q in fractions] == [16, 61] and fractions[1]["vote"]["mIoU"] == 0.915
    assert [q["n_masks"] for q in masks] == [0, 25, 100] and masks[0]["vote"]["mIoU"] == 0.915
    table["learned_vote_m0"] = {**figs(0.916), **meta, "iterations": 600, "n_masks": 0}  # its own row wins
    assert recorded_points(table)[2][0]["vote"]["mIoU"] == 0.916


def test_a_point_over_seeds_is_their_mean_and_keeps_each_seeds_miou():
    """--seeds: one run per seed, the point the mean (so a curve over 0 → all masks shows its spread)."""
    from training.curve import mean_point, recorded_points

    def point(miou, ap, minutes):
        return {"iterations": 600, "train_minutes_cpu": minutes, "n_train_images": 80, "n_train_boxes": 731,
                "n_masks": 731, "map": {"mIoU": miou, "AP": ap, "n_boxes": 619}, "vote": {"mIoU": miou + 0.05}}

    q = mean_point([point(0.60, 30.0, 40.0), point(0.70, 34.0, 50.0)], [1, 2], ("map", "vote", "whole"))
    assert q["seeds"] == [1, 2] and q["train_minutes_cpu"] == 45.0 and "whole" not in q
    assert q["map"]["mIoU"] == pytest.approx(0.65) and q["map"]["AP"] == pytest.approx(32.0)
    assert q["map"]["mIoU_per_seed"] == [0.60, 0.70] and q["vote"]["mIoU_per_seed"] == [0.65, 0.75]
    # recorded as learned_<engine>_mall, read back with the spread
    row = {**q["map"], **{k: q[k] for k in ("iterations", "train_minutes_cpu", "n_train_images", "n_train_boxes",
                                           "n_masks")}, "seeds": [1, 2], "n_seeds": 2}
    masks = recorded_points({"learned_map_mall": row})[2]
    assert masks[0]["n_masks"] == 731 and masks[0]["map"]["mIoU_per_seed"] == [0.60, 0.70]
