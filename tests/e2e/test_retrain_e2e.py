"""Retrain from a real Label Studio 1.23.2 project, publish, serve, score; and a failed retrain.

One flow (module fixture ``flow``):

1. a project over coco-mini train2017 (``N_IMAGES`` images imported through a Local Files storage):
   every image annotated with its ground-truth boxes, ``N_POLYGON_TASKS`` of them also with the
   annotator's polygons (coco's masks, as an annotator would correct them);
2. our backend under gunicorn connected as the project's ML backend (serves GrabCut: no version yet);
3. Label Studio's Start Training button (``POST /api/ml/{id}/train``) → our /webhook → a detached
   ``python -m training.retrain`` with a tiny schedule (``RETRAIN_ARGS="--max-iter …"``) → ``v0001``
   published;
4. "Retrieve predictions" through Label Studio → the stored predictions carry ``sim-v0001``;
5. the S_k table holds one row per box for v0001; ``training.scores --push`` stores the masks as
   predictions whose task score is the task's lowest S_k;
6. a second retrain (command line, as cron runs it) whose Label Studio stops answering mid-way (a relay in front of the real server
   that goes dead after a few requests) fails with exit code 4 and a message, while v0001 keeps
   serving and no v0002 appears.

The quality gate is exercised by tests/test_registry.py; here ``--tolerance 1`` lets the tiny
schedule's model through, since a 4-iteration model is not expected to beat GrabCut.
"""
from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.e2e import ls_harness as H
from sim_backend.label_studio import LabelStudioConnection, LabelStudioError
from sim_model.registry import ModelRegistry, ProjectLock
from training import ls_export
from training.publish import choose_variant
from training.score_store import ScoreDB

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_IMAGES = 20
N_POLYGON_TASKS = 3
MAX_ITER = 4
REPO = Path(__file__).resolve().parents[2]



def polygon_results(coco: dict, image_id: int) -> list[dict]:
    """The image's single-polygon COCO masks as ``polygonlabels`` results (percent), ids ``poly<ann id>``."""
    img = next(i for i in coco["images"] if i["id"] == image_id)
    w, h = img["width"], img["height"]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out = []
    for a in coco["annotations"]:
        if a["image_id"] != image_id or a.get("iscrowd", 0) or not isinstance(a["segmentation"], list):
            continue
        pts = np.asarray(a["segmentation"][0], dtype=np.float64).reshape(-1, 2)
        out.append({"id": f"poly{a['id']}", "type": "polygonlabels", "from_name": "polygon", "to_name": "image",
                    "original_width": w, "original_height": h, "image_rotation": 0,
                    "value": {"points": [[100 * x / w, 100 * y / h] for x, y in pts], "closed": True,
                              "polygonlabels": [names[a["category_id"]]]}})
    return out


def run_retrain(label_studio_url: str, api_key: str, project: int, model_dir: Path, *extra: str,
                timeout: float = 1500) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training.retrain", "--project", str(project), "--url", label_studio_url,
           "--api-key", api_key, "--model-dir", str(model_dir), "--max-iter", str(MAX_ITER), "--tolerance", "1",
           "--timeout", "20", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


class DyingRelay:
    """An HTTP relay in front of Label Studio that forwards ``alive_for`` requests, then goes dead.

    After that, every connection is dropped without an answer and the listening socket is closed: to
    its client, the Label Studio server stopped mid-way. Nothing in the retrain knows about the relay.
    """

    def __init__(self, target: str, alive_for: int):
        self.target, self.alive_for, self.count = target.rstrip("/"), alive_for, 0
        self.lock = threading.Lock()
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _relay(self):
                with relay.lock:
                    relay.count += 1
                    dead = relay.count > relay.alive_for
                if dead:
                    self.close_connection = True
                    threading.Thread(target=relay.server.shutdown, daemon=True).start()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(self.command, relay.target + self.path, headers=headers, data=body,
                                     timeout=60, allow_redirects=False)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "content-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", H.free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Project:
    id: int
    ml_id: int
    model_dir: Path
    backend: H.BackendServer
    task_boxes: dict[int, int]           # task id -> number of boxes
    polygon_tasks: list[int]
    n_polygons: int
    labels: set[str]


@dataclass
class Flow:
    project: int
    ml_id: int
    model_dir: Path
    backend: H.BackendServer
    task_boxes: dict[int, int]
    polygon_tasks: list[int]
    first: subprocess.CompletedProcess
    timings: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def project(label_studio, ls_client, start_backend, coco_train, tmp_path_factory) -> Project:
    """The annotated project with our backend connected (no model version yet)."""
    coco = coco_train["json"]
    images = H.select_images(coco, N_IMAGES)
    folder = H.stage_images(images, coco_train["images"], label_studio.document_root / "coco-train2017-retrain")
    client = ls_client
    config = H.labeling_config([c["name"] for c in coco["categories"]], brush=False)
    pid = H.create_project(client, "coco-mini train2017 retrain e2e", config)
    H.add_local_files_storage(client, pid, folder)
    by_name = {i["file_name"]: i["id"] for i in images}
    task_boxes, polygon_tasks, n_polygons, labels = {}, [], 0, set()
    for task in sorted(H.list_tasks(client, pid), key=lambda t: t["id"]):
        image_id = by_name[H.task_file_name(task)]
        result = H.coco_box_results(coco, image_id)
        if len(polygon_tasks) < N_POLYGON_TASKS and polygon_results(coco, image_id):
            polys = polygon_results(coco, image_id)
            result += polys
            n_polygons += len(polys)
            polygon_tasks.append(task["id"])
        client.annotations.create(id=task["id"], result=result)
        task_boxes[task["id"]] = sum(1 for r in result if r["type"] == "rectanglelabels")
        labels |= {r["value"][r["type"]][0] for r in result}
    model_dir = tmp_path_factory.mktemp("models")
    # retrains started by the backend (Start Training button) use the tiny schedule too
    backend = start_backend(model_dir, extra_env={"RETRAIN_ARGS": f"--max-iter {MAX_ITER} --tolerance 1 --timeout 20"})
    ml_id = H.connect_ml_backend(client, pid, backend.url, basic_auth=backend.auth)
    assert H.ml_backend_model_version(client, ml_id).startswith("grabcut")
    return Project(pid, ml_id, model_dir, backend, task_boxes, polygon_tasks, n_polygons, labels)


@pytest.fixture(scope="module")
def flow(project, ls_client) -> Flow:
    """The first retrain of the project, started by Label Studio's Start Training button (tiny schedule)."""
    t0 = time.monotonic()
    ls_client.ml.train(id=project.ml_id)  # Label Studio -> POST /webhook START_TRAINING -> detached retrain
    logs = project.model_dir / str(project.id) / "logs"
    while not (logs.is_dir() and list(logs.glob("retrain-*.log"))):
        assert time.monotonic() - t0 < 120, "Start Training did not start a retrain: " + project.backend.tail_log()
        time.sleep(0.5)
    lock = ProjectLock(project.model_dir, project.id)
    while lock.is_held():
        assert time.monotonic() - t0 < 1800, "the retrain did not finish in 30 min"
        time.sleep(2)
    log = next(logs.glob("retrain-*.log")).read_text()
    codes = re.findall(r"exit (\d+)", log)
    rc = int(codes[-1]) if codes else -1
    print(log[-5000:])
    first = subprocess.CompletedProcess(["START_TRAINING"], rc, stdout=log, stderr=log)
    return Flow(project.id, project.ml_id, project.model_dir, project.backend, project.task_boxes,
                project.polygon_tasks, first, {"retrain_s": time.monotonic() - t0})


def test_export_from_real_label_studio(project, label_studio, tmp_path):
    """label-studio-sdk export of the live project: boxes, polygons, class map, incremental image cache."""
    reg = ModelRegistry(tmp_path / "models")
    ex = ls_export.export_project(project.id, LabelStudioConnection(label_studio.url, label_studio.api_key),
                                  tmp_path / "cache", reg,
                                  progress=lambda m: None)
    assert len(ex.tasks) == N_IMAGES and not ex.skipped and ex.n_unlabeled == 0
    assert ex.n_boxes == sum(project.task_boxes.values())
    assert ex.n_masks == project.n_polygons and {t.task_id for t in ex.tasks if t.masks} == set(project.polygon_tasks)
    assert set(ex.labels) == project.labels and reg.load_class_map(project.id) == ex.labels
    assert (ex.downloaded, ex.reused) == (N_IMAGES, 0)
    # the cached image is the served one, upright, with the size Label Studio reports
    t = ex.tasks[0]
    from PIL import Image

    with Image.open(t.file) as im:
        assert im.size == (t.width, t.height)
    again = ls_export.export_project(project.id, LabelStudioConnection(label_studio.url, label_studio.api_key),
                                  tmp_path / "cache", reg,
                                     progress=lambda m: None)
    assert (again.downloaded, again.reused) == (0, N_IMAGES)
    assert again.coco_train() == ex.coco_train()
    # a wrong key is refused with a clear message, not a crash
    with pytest.raises(LabelStudioError, match="401|403"):
        ls_export.export_project(project.id, LabelStudioConnection(label_studio.url, "wrong-key"), tmp_path / "c2",
                                 reg, progress=lambda m: None)


def test_start_training_for_a_project_label_studio_does_not_know_is_404_and_writes_nothing(project):
    """The backend asks the real Label Studio (its PAT) before it writes a lock for a project."""
    r = requests.post(project.backend.url + "/webhook", auth=project.backend.auth, timeout=60,
                      json={"action": "START_TRAINING", "project": {"id": project.id + 9000}})
    assert r.status_code == 404 and f"no project {project.id + 9000}" in r.json()["error"], r.text
    assert not (project.model_dir / str(project.id + 9000)).exists()


def test_retrain_publishes_a_new_version(flow):
    assert flow.first.returncode == 0, flow.first.stderr[-3000:]
    reg = ModelRegistry(flow.model_dir)
    assert reg.current_version(flow.project) == "v0001"
    vdir = reg.version_dir(flow.project, "v0001")
    assert {p.name for p in vdir.iterdir()} >= {"model.pth", "config.yaml", "classes.json", "metrics.json",
                                                "train_log.txt"}
    metrics = json.loads((vdir / "metrics.json").read_text())
    n_boxes = sum(flow.task_boxes.values())
    assert metrics["data"]["boxes"] == n_boxes and metrics["data"]["tasks"] == N_IMAGES
    # the annotators' polygons: a fixed share validates, the others taught their instances
    d = metrics["data"]
    assert d["val_masks"] >= 1 and d["val_masks"] + d["train_masks"] >= N_POLYGON_TASKS
    assert metrics["val"]["n_masks"] == d["val_masks"] and 0.0 <= metrics["val"]["mIoU"] <= 1.0
    # the gate measured the map with each combination of colour steps, GrabCut and the served engine (GrabCut)
    v = metrics["variants"]
    assert set(v) == {"map", "refine", "vote", "refine+vote"}
    served = next(n for n in v if v[n]["model_version"] == metrics["val"]["model_version"])
    gate = metrics["gate"]  # the default (the vote) unless another variant beats it significantly
    assert served == choose_variant(gate["per_box_iou"], gate["default_variant"], gate["switch_z"])
    assert all(len(ious) == d["val_masks"] for ious in gate["per_box_iou"].values())
    assert metrics["engine"] == {"refine": "refine" in served.split("+"), "vote": "vote" in served.split("+")}
    assert metrics["grabcut"]["model_version"].startswith("grabcut")
    assert metrics["baseline"]["model_version"].startswith("grabcut") and metrics["baseline"]["version"] is None
    assert metrics["publish"]["published"] is True  # (the tiny schedule passes only with --tolerance 1)
    # the schedule: --max-iter iterations, the LR dropping at RETRAIN.LR_STEPS of them
    assert "LR steps [3]" in flow.first.stdout
    assert "PUBLISHED" in flow.first.stdout and "[retrain] 4/7" in flow.first.stdout
    # the class map holds every label of the project, and the version's classes.json equals it
    labels = json.loads((vdir / "classes.json").read_text())["labels"]
    assert labels == reg.load_class_map(flow.project) and len(labels) >= 1


def test_backend_serves_the_new_version(flow, ls_client):
    assert flow.first.returncode == 0
    tasks = sorted(flow.task_boxes)[:3]
    H.retrieve_predictions(ls_client, flow.project, tasks)
    preds = [p for p in H.list_predictions(ls_client, flow.project) if p["task"] in tasks]
    assert preds, flow.backend.tail_log()
    served = ModelRegistry(flow.model_dir).model_version(flow.project, "v0001")  # sim-v0001[+refine][+vote]
    assert {p["model_version"] for p in preds} == {served}, flow.backend.tail_log()
    for p in preds:  # a 4-iteration model may give empty masks (no region); what it gives must decode
        assert all(H.region_mask(r).any() for r in H.regions_by_type(p["result"], "polygonlabels"))


def test_scores_table_is_filled_and_pushed(flow, ls_client):
    assert flow.first.returncode == 0
    db = ScoreDB.for_project(flow.model_dir, flow.project)
    rows = db.rows("v0001")
    assert len(rows) == sum(flow.task_boxes.values())
    assert {r["task"] for r in rows} == set(flow.task_boxes)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    out = subprocess.run([sys.executable, "-m", "training.scores", "--project", str(flow.project), "--model-dir",
                          str(flow.model_dir), "--worst", "5", "--push", "--url", flow.backend.label_studio_url,
                          "--api-key", flow.backend.api_key], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "5 worst boxes" in out.stdout
    rows = db.rows("v0001")
    worst_task = {}
    for r in rows:
        worst_task[r["task"]] = min(worst_task.get(r["task"], 1.0), r["score"])
    served = ModelRegistry(flow.model_dir).model_version(flow.project, "v0001")
    preds = [p for p in H.list_predictions(ls_client, flow.project) if p["model_version"] == served]
    by_task = Counter(p["task"] for p in preds)
    assert set(by_task) == set(flow.task_boxes) and max(by_task.values()) == 1  # one per task, no duplicates
    for p in preds:
        assert p["score"] == pytest.approx(worst_task[p["task"]], abs=1e-4)
        assert {round(r["score"], 4) for r in p["result"]} <= {round(r["score"], 4) for r in rows
                                                               if r["task"] == p["task"]}
    assert H.count_annotations(ls_client, flow.project) == len(flow.task_boxes)  # predictions only


def test_retrain_fails_when_label_studio_stops_midway(flow, label_studio, tmp_path):
    assert flow.first.returncode == 0
    relay = DyingRelay(label_studio.url, alive_for=4)  # project + task list + 2 images, then dead
    try:
        r = run_retrain(relay.url, label_studio.api_key, flow.project, flow.model_dir,
                        "--cache-dir", str(tmp_path / "fresh-cache"), timeout=600)
    finally:
        relay.close()
    assert r.returncode == 4, (r.stdout[-2000:], r.stderr[-2000:])
    assert "stopped answering" in r.stderr and "v0001 keeps serving" in r.stderr
    reg = ModelRegistry(flow.model_dir)
    assert reg.current_version(flow.project) == "v0001"
    assert reg.version_names(flow.project) == ["v0001"]
    assert not [p for p in reg.project_dir(flow.project).iterdir() if p.name.startswith((".v", ".work"))]
    served = requests.get(f"{flow.backend.url}/versions", params={"project": flow.project}, timeout=60,
                          auth=flow.backend.auth).json()
    assert served["current"] == reg.model_version(flow.project, "v0001"), served


def test_a_misa_retrain_trains_and_keeps_its_teacher_and_is_served(flow, label_studio, ls_client):
    """After the failed retrain: MISA switched on (``MODEL.MISA.ENABLED True``) — the BSSS teacher trains on the
    project's boxes before the instance network, the new version keeps it, and the backend serves the version."""
    assert flow.first.returncode == 0
    r = run_retrain(label_studio.url, label_studio.api_key, flow.project, flow.model_dir, "MODEL.MISA.ENABLED", "True")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "MISA switched since v0001" in r.stdout and "MISA: BSSS teacher for" in r.stdout
    reg = ModelRegistry(flow.model_dir)
    assert reg.current_version(flow.project) == "v0002"
    vdir = reg.version_dir(flow.project, "v0002")
    assert (vdir / "bsss_model.pth").is_file() and (vdir / "bsss_config.yaml").is_file()
    cfg = (vdir / "config.yaml").read_text()
    assert re.search(r"MISA:\n(\s+.*\n)*?\s+ENABLED: true", cfg)
    assert "WEIGHTS: bsss_model.pth" in cfg and "CONFIG: bsss_config.yaml" in cfg
    assert "META_ARCHITECTURE: BoxSemSeg" in (vdir / "bsss_config.yaml").read_text()
    tasks = sorted(flow.task_boxes)[3:5]
    H.retrieve_predictions(ls_client, flow.project, tasks)
    served = reg.model_version(flow.project, "v0002")
    preds = [p for p in H.list_predictions(ls_client, flow.project) if p["task"] in tasks]
    assert served in {p["model_version"] for p in preds}, flow.backend.tail_log()
    assert H.count_annotations(ls_client, flow.project) == len(flow.task_boxes)  # predictions only
