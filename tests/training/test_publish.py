"""The gate's measurements (training.publish.validate_against_served) and what a version then serves."""
from __future__ import annotations

import json
import shutil

from sim_model.engines import version_engine
from sim_model.registry import ModelRegistry
from tests.support import COCO_VAL_IMAGES, COCO_VAL_JSON
from training.publish import validate_against_served


def _val_subset(tmp_path, n_images: int = 3):
    data = json.loads(COCO_VAL_JSON.read_text())
    images = sorted(data["images"], key=lambda i: i["id"])[:n_images]
    ids = {i["id"] for i in images}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(dict(data, images=images, annotations=[a for a in data["annotations"]
                                                                      if a["image_id"] in ids])))
    return path


def test_the_gate_measures_every_variant_and_grabcut_and_the_version_serves_the_best(sim_version_dir, tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    lines = []
    res = validate_against_served(sim_version_dir, "v0001", reg, "7", _val_subset(tmp_path), COCO_VAL_IMAGES,
                                  lines.append)
    v = res["variants"]
    assert list(v) == ["map", "refine", "vote", "refine+vote"]
    assert len({x["n_masks"] for x in v.values()}) == 1 and v["map"]["n_masks"] > 0
    assert [x["model_version"] for x in v.values()] == [
        "sim-v0001", "sim-v0001+refine", "sim-v0001+vote", "sim-v0001+refine+vote"]
    best = max(v, key=lambda n: v[n]["mIoU"])
    assert res["val"] == v[best] and all(v[best]["mIoU"] >= x["mIoU"] for x in v.values())
    assert res["engine"] == {"refine": "refine" in best, "vote": "vote" in best}
    # the vote differs from both of its parents on these boxes (it is not one of them under another name)
    assert v["vote"]["mIoU"] not in (v["map"]["mIoU"], res["grabcut"]["mIoU"])
    # nothing served yet: the baseline is GrabCut, measured once
    assert res["grabcut"]["model_version"] == "grabcut-v1" and res["baseline"]["mIoU"] == res["grabcut"]["mIoU"]
    assert res["baseline"]["version"] is None and any("GrabCut" in line for line in lines)
    # the version then serves the variant recorded in its metrics
    vdir = tmp_path / "v0001"
    shutil.copytree(sim_version_dir, vdir)
    for refine, vote in ((True, False), (False, False), (False, True), (True, True)):
        (vdir / "metrics.json").write_text(json.dumps({"engine": {"refine": refine, "vote": vote}}))
        engine = version_engine(vdir)
        assert (engine.refine, engine.vote) == (refine, vote)
        assert engine.model_version == "sim-v0001" + "+refine" * refine + "+vote" * vote
