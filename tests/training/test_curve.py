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
