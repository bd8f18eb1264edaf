"""Engine choice and hot reload (sim_backend.engines) over a real model registry directory."""
import logging
import shutil
import threading

import cv2
import numpy as np
import pytest

from sim_backend.app import create_app
from sim_backend.engines import EngineProvider
from sim_backend.regions import brush_rle_to_mask, mask_to_polygons, pixels_to_percent, polygons_to_mask
from sim_backend.settings import Settings
from sim_model.engines.grabcut import GrabCutBoxToMask
from sim_model.engines.sim import SIMBoxToMask
from sim_model.registry import REQUIRED_FILES, ModelRegistry, sim_model_version
from tests.support import COCO_VAL_IMAGES, DATA_ROOTS, coco_boxes, coco_config, iou, rect_item

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
    masks = p.get(PROJECT).predict(img, np.array([[25, 15, 65, 45]], np.float32), ["x"]).dense()
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


def test_real_sim_version_is_served_then_rolled_back(tmp_path, sim_version_dir):
    """A real SIM model version, published in the registry, answers /predict through the default loader: the
    polygons are the version's own mask of the box (thresholded between its lowest and highest value, so it is
    neither empty nor the whole box); without a current version GrabCut answers again."""
    vdir = ModelRegistry(tmp_path).version_dir(PROJECT, "v0001")
    shutil.copytree(sim_version_dir, vdir)
    ModelRegistry(tmp_path).set_current(PROJECT, "v0001")
    label, xywh, _ = coco_boxes(139, min_area=2000)[0]
    image_path = COCO_VAL_IMAGES / "000000000139.jpg"
    image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
    box = np.array([[xywh[0], xywh[1], xywh[0] + xywh[2], xywh[1] + xywh[3]]], np.float32)
    own = SIMBoxToMask.from_version_dir(vdir).predict(image, box, [label])
    threshold = float(own.crops[0].min() + own.crops[0].max()) / 2
    expected = own.full(0) >= threshold
    assert 0 < expected.sum() < (own.crops[0].size * 0.999)

    client = create_app(Settings(model_dir=tmp_path, mask_threshold=threshold, min_region_px=0,
                                 local_files_roots=DATA_ROOTS)).test_client()
    assert client.post("/setup", json={"project": f"{PROJECT}.17", "schema": coco_config()}).get_json() == {
        "model_version": "sim-v0001"}
    payload = {"project": f"{PROJECT}.17", "label_config": coco_config(),
               "tasks": [{"id": 1, "data": {"image": str(image_path)}}],
               "params": {"polygon_tolerance_px": 0,
                          "context": {"result": [rect_item(label, xywh, 640, 426)]}}}
    body = client.post("/predict", json=payload).get_json()
    result = body["results"][0]
    assert result["model_version"] == "sim-v0001" and body["errors"] == [] and body["skipped"] == []
    polys = [r["value"]["points"] for r in result["result"] if r["type"] == "polygonlabels"]
    brushes = [r["value"]["rle"] for r in result["result"] if r["type"] == "brushlabels"]
    assert {r["type"] for r in result["result"]} == {"polygonlabels", "brushlabels"} and len(brushes) == 1
    # the brush is the version's mask pixel for pixel; the polygons are that mask's outlines (a one-iteration
    # model's mask is speckled, so it is compared with its own outlines, not with the holes they cannot show)
    assert np.array_equal(brush_rle_to_mask(brushes[0], 640, 426), expected)
    outlines = [pixels_to_percent(p, 640, 426) for p in mask_to_polygons(expected, 0.5, 0.0, 0)]
    assert iou(polygons_to_mask(polys, 640, 426), polygons_to_mask(outlines, 640, 426)) > 0.999
    assert result["score"] == pytest.approx(float(own.scores[0]), abs=1e-5)
    (tmp_path / str(PROJECT) / "CURRENT").unlink()       # no current version any more → GrabCut
    assert client.post("/predict", json=payload).get_json()["results"][0]["model_version"] == "grabcut-v1"
