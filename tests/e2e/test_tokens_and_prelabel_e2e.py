"""A stock Label Studio (legacy tokens off, a Personal Access Token) and the legacy-token path, through the real
servers; ``python -m training.prelabel`` on a project of coco-mini val2017 images.

- the stock server of the session refuses legacy tokens, and the backend it talks to requires basic auth;
- a second Label Studio with legacy tokens on still works with a legacy token (Retrieve predictions);
- prelabel writes one prediction per task with boxes, resumes where a limited run stopped, never adds an
  annotation, and says how many tasks per minute it wrote.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests

from sim_backend.label_studio import key_kind
from tests.e2e import ls_harness as H

pytestmark = pytest.mark.e2e
N_IMAGES = 8


def _project(client, coco_val, folder, title):
    coco = coco_val["json"]
    images = H.select_images(coco, N_IMAGES)
    ids = {im["id"] for im in images}
    subset = {"images": images, "categories": coco["categories"],
              "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    config = H.labeling_config([c["name"] for c in coco["categories"]], brush=False)
    pid = H.create_project(client, title, config)
    H.add_local_files_storage(client, pid, H.stage_images(images, coco_val["images"], folder))
    H.create_gt_box_annotations(client, pid, subset)
    return pid


def test_the_session_label_studio_is_stock_and_the_backend_requires_basic_auth(label_studio, start_backend,
                                                                                 tmp_path_factory):
    assert key_kind(label_studio.api_key) == "personal access token"
    legacy = requests.get(f"{label_studio.url}/api/current-user/whoami", timeout=30,
                          headers={"Authorization": f"Token {label_studio.api_key}"})
    assert legacy.status_code == 401  # a PAT is no legacy token
    backend = start_backend(tmp_path_factory.mktemp("models-auth"))
    assert requests.get(f"{backend.url}/health", timeout=30).status_code == 200
    assert requests.post(f"{backend.url}/predict", json={"tasks": []}, timeout=30).status_code == 401
    assert requests.post(f"{backend.url}/predict", json={"tasks": []}, timeout=30,
                         auth=backend.auth).status_code == 400  # authenticated, then refused for no tasks


def test_a_legacy_token_still_works(coco_val, start_backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("label-studio-legacy")
    with H.LabelStudioServer(root / "server", root / "document-root", legacy_token=H.DEFAULT_LEGACY_TOKEN) as ls:
        assert key_kind(ls.api_key) == "legacy token"
        client = ls.client()
        pid = _project(client, coco_val, ls.document_root / "imgs", "legacy token e2e")
        backend = H.BackendServer(tmp_path_factory.mktemp("backend-legacy"), label_studio_url=ls.url,
                                  api_key=ls.api_key, model_dir=tmp_path_factory.mktemp("models-legacy")).start()
        try:
            ml_id = H.connect_ml_backend(client, pid, backend.url)
            tasks = [t["id"] for t in H.list_tasks(client, pid)]
            H.retrieve_predictions(client, pid, tasks)
            preds = H.list_predictions(client, pid)
            assert H.ml_backend_model_version(client, ml_id) == "grabcut-v1"
        finally:
            backend.stop()
    assert len(preds) == N_IMAGES and all(H.regions_by_type(p["result"], "polygonlabels") for p in preds)


def _prelabel(label_studio, pid, model_dir, *extra):
    env = dict(os.environ, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
               MODEL_DIR=str(model_dir), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "training.prelabel", "--project", str(pid), *extra], cwd=H.REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_prelabel_writes_every_task_resumably_and_never_annotations(label_studio, ls_client, coco_val,
                                                                     tmp_path_factory):
    pid = _project(ls_client, coco_val, label_studio.document_root / "prelabel", "prelabel e2e")
    model_dir = tmp_path_factory.mktemp("models-prelabel")
    annotations = H.count_annotations(ls_client, pid)
    first = _prelabel(label_studio, pid, model_dir, "--limit", "3")
    assert "3 predictions written as grabcut-v1" in first and "[prelabel] [" in first  # a progress bar
    assert len(H.list_predictions(ls_client, pid)) == 3
    second = _prelabel(label_studio, pid, model_dir)
    assert f"{N_IMAGES - 3} predictions written" in second and "3 already had one" in second
    preds = H.list_predictions(ls_client, pid)
    assert len(preds) == N_IMAGES and len({p["task"] for p in preds}) == N_IMAGES
    assert all(p["model_version"] == "grabcut-v1" and H.regions_by_type(p["result"], "polygonlabels") for p in preds)
    third = _prelabel(label_studio, pid, model_dir)
    assert "0 predictions written" in third and f"{N_IMAGES} already had one" in third
    assert H.count_annotations(ls_client, pid) == annotations
    rate = float(re.search(r"\(([\d.]+) tasks/min\)", second).group(1))
    print(f"\n[e2e] prelabel: {rate:.1f} tasks/min over {N_IMAGES - 3} tasks (GrabCut, 2 shared cores)")
    assert rate > 0
