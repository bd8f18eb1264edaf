"""Engine choice and hot reload (sim_backend.engines) over a real model registry directory."""
import logging
import threading

import numpy as np

from sim_backend.engines import EngineProvider
from sim_model.box_to_mask import sim_model_version
from sim_backend.settings import Settings
from sim_model.engines.grabcut import GrabCutBoxToMask
from training.registry import REQUIRED_FILES, ModelRegistry

PROJECT = 12


def _publish(root, version, payload="x"):
    """Write a complete version directory the way training does, then switch CURRENT to it."""
    reg = ModelRegistry(root)
    vdir = reg.version_dir(PROJECT, version)
    vdir.mkdir(parents=True)
    for f in REQUIRED_FILES:
        (vdir / f).write_text(payload)
    reg.set_current(PROJECT, version)
    return vdir


class VersionDirEngine(GrabCutBoxToMask):
    """A real engine standing in for SIM's loader: records which version directory it was built from."""

    def __init__(self, vdir):
        super().__init__()
        self.vdir = vdir
        self.model_version = "sim-" + vdir.name


def test_without_a_model_grabcut_serves(tmp_path):
    p = EngineProvider(Settings(model_dir=tmp_path))
    assert isinstance(p.get(PROJECT), GrabCutBoxToMask)
    assert p.get(None) is p.get(PROJECT)
    assert p.model_version(PROJECT) == "grabcut-v1"
    assert p.list_versions(PROJECT) == ["grabcut-v1"]


def test_incomplete_version_is_never_served(tmp_path):
    vdir = ModelRegistry(tmp_path).version_dir(PROJECT, "v0001")
    vdir.mkdir(parents=True)
    (vdir / "model.pth").write_text("half written")
    (tmp_path / str(PROJECT) / "CURRENT").write_text("v0001\n")
    loads = []
    p = EngineProvider(Settings(model_dir=tmp_path), sim_loader=lambda d: loads.append(d) or VersionDirEngine(d))
    assert p.get(PROJECT).model_version == "grabcut-v1" and loads == []
    assert p.list_versions(PROJECT) == ["grabcut-v1"]


def test_hot_reload_switches_when_current_changes_and_version_stays_stable(tmp_path):
    loads = []

    def loader(vdir):
        loads.append(vdir.name)
        return VersionDirEngine(vdir)

    p = EngineProvider(Settings(model_dir=tmp_path), sim_loader=loader)
    assert p.get(PROJECT).model_version == "grabcut-v1"
    _publish(tmp_path, "v0001")
    assert p.model_version(PROJECT) == "sim-v0001"          # announced before loading (/setup)
    e1 = p.get(PROJECT)
    assert e1.model_version == "sim-v0001" and p.get(PROJECT) is e1 and loads == ["v0001"]
    _publish(tmp_path, "v0002")
    e2 = p.get(PROJECT)
    assert e2.model_version == "sim-v0002" and e2 is not e1 and loads == ["v0001", "v0002"]
    assert p.list_versions(PROJECT) == ["grabcut-v1", "sim-v0001", "sim-v0002"]
    ModelRegistry(tmp_path).set_current(PROJECT, "v0001")   # rollback
    assert p.get(PROJECT).model_version == "sim-v0001"
    # the served engine really segments
    img = np.zeros((60, 80, 3), np.uint8)
    img[20:40, 30:60] = 200
    masks, scores = p.get(PROJECT).predict(img, np.array([[25, 15, 65, 45]], np.float32), ["x"])
    assert masks.shape == (1, 60, 80) and masks[0, 30, 45] > 0.5 and masks[0, 5, 5] == 0


def test_engine_reporting_another_version_is_served_under_the_announced_one(tmp_path):
    def loader(vdir):
        e = GrabCutBoxToMask()
        e.model_version = "something-else"
        return e

    _publish(tmp_path, "v0003")
    p = EngineProvider(Settings(model_dir=tmp_path), sim_loader=loader)
    announced = p.model_version(PROJECT)
    assert p.get(PROJECT).model_version == announced == sim_model_version("v0003")


def test_broken_model_falls_back_to_grabcut_with_a_logged_error(tmp_path, caplog):
    _publish(tmp_path, "v0001", payload="not a checkpoint")

    def loader(vdir):
        raise RuntimeError(f"cannot read {vdir / 'model.pth'}")

    p = EngineProvider(Settings(model_dir=tmp_path), sim_loader=loader)
    with caplog.at_level(logging.ERROR, logger="sim_backend"):
        e = p.get(PROJECT)
    assert e.model_version == "grabcut-v1"
    assert "cannot load model version v0001" in caplog.text and "serving grabcut-v1" in caplog.text
    assert p.model_version(PROJECT) == "grabcut-v1"


def test_default_sim_loader_failure_serves_grabcut(tmp_path, caplog):
    """The real loader (sim_model.engines.sim) on a bogus version directory must not break serving."""
    _publish(tmp_path, "v0001", payload="not a checkpoint")
    p = EngineProvider(Settings(model_dir=tmp_path))
    with caplog.at_level(logging.ERROR, logger="sim_backend"):
        assert p.get(PROJECT).model_version == "grabcut-v1"
    assert "cannot load model version v0001" in caplog.text


def test_concurrent_requests_load_a_version_once(tmp_path):
    loads = []
    gate = threading.Event()

    def loader(vdir):
        loads.append(vdir.name)
        gate.wait(2)
        return VersionDirEngine(vdir)

    _publish(tmp_path, "v0001")
    p = EngineProvider(Settings(model_dir=tmp_path), sim_loader=loader)
    got = []
    threads = [threading.Thread(target=lambda: got.append(p.get(PROJECT))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert loads == ["v0001"] and len({id(e) for e in got}) == 1


def test_real_sim_version_is_served_then_rolled_back(tmp_path):
    """A real (randomly initialised, small test resolution) SIM model version through the default loader."""
    import json

    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import sim_model.modeling  # noqa: F401  (registers the meta-architecture)
    from sim_backend.app import create_app
    from sim_model.config import get_sim_cfg
    from tests.backend_fixtures import COCO_VAL_IMAGES, coco_boxes, coco_config, rect_item

    labels = ["tv", "chair", "potted plant"]
    cfg = get_sim_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False
    cfg.MODEL.FCOS.NUM_CLASSES = len(labels)
    cfg.MODEL.SIM.ENABLED = True
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 192, 320
    torch.manual_seed(0)
    vdir = ModelRegistry(tmp_path).version_dir(PROJECT, "v0001")
    vdir.mkdir(parents=True)
    DetectionCheckpointer(build_model(cfg).eval(), save_dir=str(vdir)).save("model")
    (vdir / "config.yaml").write_text(cfg.dump())
    (vdir / "classes.json").write_text(json.dumps({"labels": labels}))
    ModelRegistry(tmp_path).set_current(PROJECT, "v0001")

    client = create_app(Settings(model_dir=tmp_path)).test_client()
    assert client.post("/setup", json={"project": f"{PROJECT}.17", "schema": coco_config()}).get_json() == {
        "model_version": "sim-v0001"}
    label, xywh, _ = coco_boxes(139, min_area=2000)[0]
    payload = {"project": f"{PROJECT}.17", "label_config": coco_config(),
               "tasks": [{"id": 1, "data": {"image": str(COCO_VAL_IMAGES / "000000000139.jpg")}}],
               "params": {"context": {"result": [rect_item(label, xywh, 640, 426)]}}}
    body = client.post("/predict", json=payload).get_json()
    assert body["results"][0]["model_version"] == "sim-v0001" and body["errors"] == []
    # An untrained network's mask for the box may be empty: then the box is reported as skipped with that
    # reason (never dropped silently); otherwise it is answered as polygon + brush regions.
    types = {r["type"] for r in body["results"][0]["result"]}
    reasons = [s["reason"] for s in body["skipped"]]
    assert types == {"polygonlabels", "brushlabels"} or (not types and reasons and "empty mask" in reasons[0])
    (tmp_path / str(PROJECT) / "CURRENT").unlink()       # no current version any more → GrabCut
    assert client.post("/predict", json=payload).get_json()["results"][0]["model_version"] == "grabcut-v1"
