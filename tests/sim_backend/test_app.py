"""The Flask routes (/health, /setup, /versions, /webhook) and a real gunicorn serving /predict."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sim_backend.app import create_app
from sim_backend.regions import polygons_to_mask
from sim_backend.settings import Settings
from sim_model.registry import REQUIRED_FILES, ModelRegistry
from tests.support import (COCO_VAL_IMAGES, DATA_ROOTS, box_mask, coco_boxes, coco_config, image_info, iou, rect_item,
                           sample_boxes)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def client(tmp_path):
    return create_app(Settings(model_dir=tmp_path, local_files_roots=DATA_ROOTS)).test_client()


def test_health_is_fast_json(client):
    t0 = time.monotonic()
    r = client.get("/health")
    assert r.status_code == 200 and r.get_json()["status"] == "UP"
    assert time.monotonic() - t0 < 1.0


def test_setup_validates_schema_and_answers_a_stable_version(client):
    payload = {"project": "4.1700000000", "schema": coco_config(), "hostname": "http://ls:8080", "access_token": "t"}
    r1, r2 = client.post("/setup", json=payload), client.post("/setup", json=payload)
    assert r1.status_code == 200 and r1.get_json() == {"model_version": "grabcut-v1"} == r2.get_json()
    bad = client.post("/setup", json=dict(payload, schema='<View><Image name="image" value="$image"/></View>'))
    assert bad.status_code == 400 and "box source" in bad.get_json()["error"]
    assert client.post("/setup", json={"project": 4}).status_code == 400
    assert client.post("/setup", data="nope", content_type="application/json").status_code == 400


def test_predict_uses_setup_config_when_request_has_none(client):
    label, xywh, gt = coco_boxes(139, min_area=2000)[0]
    client.post("/setup", json={"project": "4.17", "schema": coco_config(brush=False)})
    r = client.post("/predict", json={"project": "4.17", "tasks": [{"id": 1, "data": {
        "image": str(COCO_VAL_IMAGES / "000000000139.jpg")}}], "params": {"context": {"result": [
            rect_item(label, xywh, 640, 426)]}}})
    assert r.status_code == 200 and r.get_json()["results"][0]["result"]


def test_versions_lists_registry_versions_and_current(tmp_path):
    reg = ModelRegistry(tmp_path)
    for v in ("v0001", "v0002"):
        d = reg.version_dir(5, v)
        d.mkdir(parents=True)
        for f in REQUIRED_FILES:
            (d / f).write_text("x")
    reg.set_current(5, "v0002")
    c = create_app(Settings(model_dir=tmp_path)).test_client()
    body = c.get("/versions?project=5").get_json()
    assert body["versions"] == ["grabcut-v1", "sim-v0001", "sim-v0002"] and body["current"] == "sim-v0002"
    assert c.get("/versions?project=6").get_json()["versions"] == ["grabcut-v1"]
    assert c.get("/versions").get_json()["versions"] == ["grabcut-v1", "sim-v0001", "sim-v0002"]


def test_webhook_answers_at_once(client):
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 4}})
    assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    assert client.post("/webhook", data="{", content_type="application/json").status_code == 400
    r = client.post("/webhook", json={"action": "START_TRAINING"})
    assert r.status_code == 400 and r.get_json()["status"] == "error"
    assert r.get_json()["error"].startswith("webhook payload has no project id")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, payload, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def test_gunicorn_serves_predict_with_two_workers(tmp_path):
    port = _free_port()
    env = dict(os.environ, MODEL_DIR=str(tmp_path), LOG_LEVEL="WARNING", LOCAL_FILES_ROOTS=str(DATA_ROOTS[0]))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "sim_backend.wsgi:app",
                             "-b", f"127.0.0.1:{port}", "-w", "2", "--threads", "2", "--timeout", "120"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("gunicorn did not come up: " + proc.stdout.read1().decode(errors="replace"))
        samples = sample_boxes(6)
        tasks, sizes = [], []
        for img_id, label, xywh, gt in samples:
            path, w, h = image_info(img_id)
            sizes.append((w, h))
            tasks.append({"id": img_id, "data": {"image": path},
                          "annotations": [{"id": 1, "result": [rect_item(label, xywh, w, h)]}]})
        payload = {"project": "9.1700000000", "label_config": coco_config(), "tasks": tasks}
        # no /setup before: whichever worker answers must cope (multi-worker)
        for _ in range(2):
            status, body = _post(base + "/predict", payload)
            assert status == 200 and len(body["results"]) == len(tasks)
        ious, box_ious = [], []
        for res, (img_id, label, xywh, gt), (w, h) in zip(body["results"], samples, sizes):
            assert res["model_version"] == "grabcut-v1"
            polys = [r["value"]["points"] for r in res["result"] if r["type"] == "polygonlabels"]
            assert polys and all(r["value"]["polygonlabels"] == [label]
                                 for r in res["result"] if r["type"] == "polygonlabels")
            ious.append(iou(polygons_to_mask(polys, w, h), gt))
            box_ious.append(iou(box_mask(xywh, w, h), gt))
        assert np.mean(ious) > np.mean(box_ious), (ious, box_ious)
        status, body = _post(base + "/setup", {"project": "9.1700000000", "schema": coco_config()})
        assert status == 200 and body == {"model_version": "grabcut-v1"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
