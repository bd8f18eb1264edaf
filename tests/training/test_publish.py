"""The gate's measurements (training.publish.validate_against_served) and what a version then serves."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from sim_backend.settings import Settings
from sim_model.engines import version_engine
from sim_model.registry import ModelRegistry
from tests.support import COCO_VAL_IMAGES, COCO_VAL_JSON
from training.publish import choose_variant, validate_against_served


def _val_subset(tmp_path, n_images: int = 3):
    data = json.loads(COCO_VAL_JSON.read_text())
    images = sorted(data["images"], key=lambda i: i["id"])[:n_images]
    ids = {i["id"] for i in images}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(dict(data, images=images, annotations=[a for a in data["annotations"]
                                                                      if a["image_id"] in ids])))
    return path


def test_choose_variant_keeps_the_default_under_noise_and_switches_on_a_consistent_gain():
    vote = np.linspace(0.5, 0.9, 30)
    swing = np.tile([1.0, -1.0], 15)
    noisy = vote + 0.01 + 0.1 * swing         # +0.01 on average, ±0.1 per box: 2 standard errors are 0.037
    better = vote + 0.03 + 0.005 * swing      # +0.03 on every box
    assert choose_variant({"map": noisy, "vote": vote}, "vote", 2.0) == "vote"
    assert choose_variant({"map": noisy, "vote": vote}, "vote", 0.0) == "map"  # z = 0: the plain best
    assert choose_variant({"map": noisy, "vote": vote, "refine+vote": better}, "vote", 2.0) == "refine+vote"
    # among the variants that beat the default significantly, the best mean
    much = vote + 0.05 + 0.005 * swing
    assert choose_variant({"refine": better, "vote": vote, "refine+vote": much}, "vote", 2.0) == "refine+vote"
    assert choose_variant({"map": [0.9], "vote": [0.1]}, "vote", 2.0) == "vote"  # one mask decides nothing
    assert choose_variant({"map": vote - 0.05, "vote": vote}, "map", 2.0) == "vote"  # any default
    with pytest.raises(ValueError):
        choose_variant({"map": vote}, "vote", 2.0)
    with pytest.raises(ValueError):
        choose_variant({"map": vote, "vote": vote[:-1]}, "vote", 2.0)
    with pytest.raises(ValueError):
        choose_variant({"map": vote, "vote": vote}, "vote", -1.0)


def test_the_gate_measures_every_variant_and_grabcut_and_the_version_serves_its_choice(sim_version_dir, tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    lines = []
    res = validate_against_served(sim_version_dir, "v0001", reg, "7", _val_subset(tmp_path), COCO_VAL_IMAGES,
                                  lines.append)
    v = res["variants"]
    assert list(v) == ["map", "refine", "vote", "refine+vote"]
    assert len({x["n_masks"] for x in v.values()}) == 1 and v["map"]["n_masks"] > 0
    assert [x["model_version"] for x in v.values()] == [
        "sim-v0001", "sim-v0001+refine", "sim-v0001+vote", "sim-v0001+refine+vote"]
    # the per-box IoUs behind the choice are kept, match the figures, and reproduce the choice
    gate = res["gate"]
    assert gate["default_variant"] == "vote" and gate["switch_z"] == 2.0
    for name, ious in gate["per_box_iou"].items():
        assert len(ious) == v[name]["n_masks"] and np.mean(ious) == pytest.approx(v[name]["mIoU"], abs=1e-6)
    chosen = choose_variant(gate["per_box_iou"], "vote", 2.0)
    assert res["val"] == v[chosen]
    assert res["engine"] == {"refine": "refine" in chosen, "vote": "vote" in chosen}
    # with z = 0 the same measurements serve the plain best
    plain = validate_against_served(sim_version_dir, "v0001", reg, "7", _val_subset(tmp_path), COCO_VAL_IMAGES,
                                    lines.append, default_variant="map", switch_z=0.0)
    assert plain["variants"]["refine"]["mIoU"] == pytest.approx(v["refine"]["mIoU"])
    best = max(v, key=lambda n: v[n]["mIoU"])
    assert plain["val"]["mIoU"] == pytest.approx(v[best]["mIoU"])
    with pytest.raises(ValueError):
        validate_against_served(sim_version_dir, "v0001", reg, "7", _val_subset(tmp_path), COCO_VAL_IMAGES,
                                lines.append, default_variant="colour")
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


@pytest.mark.parametrize("default, served", [("vote", "sim-v0001+vote"), ("map", "sim-v0001")])
def test_a_version_without_held_out_masks_serves_the_default_variant(sim_version_dir, tmp_path, default, served):
    """A boxes-only project has no polygons to choose with: its first version serves RETRAIN.GATE.DEFAULT_VARIANT
    (the vote, which beats the map alone on every dataset's curve), not the map alone."""
    from training.retrain import RetrainJob, Trained
    from training.train import build_config

    reg = ModelRegistry(tmp_path / "models")
    job = RetrainJob(project="7", registry=reg, settings=Settings(image_cache_bytes=0), url="http://ls.invalid",
                     api_key="k", cache_dir=tmp_path / "cache", scores=False)
    labels = json.loads((sim_version_dir / "classes.json").read_text())["labels"]
    export = SimpleNamespace(tasks=[1, 2], n_boxes=5, n_masks=0, labels=labels, skipped=[], image_dir=tmp_path)
    cfg = build_config(str(sim_version_dir / "config.yaml"), ["RETRAIN.GATE.DEFAULT_VARIANT", default])
    (tmp_path / "train_log.txt").write_text("")
    version, published = job.publish(export, Trained(cfg, {}, sim_version_dir / "model.pth"), None,
                                      tmp_path / "train_log.txt", 0)
    assert (version, published) == ("v0001", True)
    metrics = reg.read_metrics("7", "v0001")
    assert metrics["engine"] == {"refine": False, "vote": default == "vote"} and "variants" not in metrics
    assert reg.model_version("7", "v0001") == served
    engine = version_engine(reg.version_dir("7", "v0001"))
    assert engine.model_version == served and engine.vote == (default == "vote") and not engine.refine
