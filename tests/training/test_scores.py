"""S_k table, CSV, histogram and CLI, on real coco-mini train2017 boxes scored by a real engine (GrabCut).

The SIM engine computes S_k with SIM Eq. 11; the table and report do not depend on which engine made
the scores, so these tests use the cold-start GrabCut engine (no trained model needed).
"""
from __future__ import annotations

import csv
import subprocess
import sys

import cv2
import numpy as np
import pytest

from PIL import Image

from sim_backend.images import ImageLoader
from sim_backend.settings import Settings
from sim_model.datasets import REPO_ROOT as REPO
from sim_model.engines.grabcut import GrabCutBoxToMask
from sim_model.registry import ModelRegistry
from tests.support import DATA_ROOTS, coco_config, coco_train_labels, make_tasks
from training import ls_export, scores
from training.predictions import predict_task
from training.score_store import ScoreDB


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scores")
    reg = ModelRegistry(tmp / "models")
    tasks, _ = make_tasks(n_images=3, polygons_on=0)
    export = ls_export.export_tasks(tasks, coco_config(labels=coco_train_labels()), 5, tmp / "cache", reg,
                                    ImageLoader(Settings(image_cache_bytes=0, local_files_roots=DATA_ROOTS)), progress=lambda m: None)
    db = ScoreDB.for_project(reg.root, 5)
    engine = GrabCutBoxToMask()
    cv2.setRNGSeed(1234)  # GrabCut's k-means initialisation draws from OpenCV's RNG
    stats = scores.compute_scores(engine, export, "v0001", db, progress=lambda m: None)
    return tmp, reg, export, db, stats, engine


def test_table_holds_one_row_per_box_and_version(scored):
    tmp, reg, export, db, stats, engine = scored
    assert db.path == tmp / "models" / "5" / "scores.sqlite"
    assert stats["n_boxes"] == export.n_boxes == db.count("v0001") and not stats["skipped"]
    rows = db.rows("v0001")
    assert [r["score"] for r in rows] == sorted(r["score"] for r in rows)  # worst first
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert len({(r["task"], r["region"]) for r in rows}) == len(rows)
    # the stored S_k is the engine's score for that box
    task = export.tasks[0]
    cv2.setRNGSeed(1234)
    pred = predict_task(engine, task)
    stored = {(r["task"], r["region"]): r["score"] for r in rows}
    assert np.allclose([stored[(task.task_id, task.boxes[i].region_id)] for i in pred.kept], pred.masks.scores,
                       atol=1e-6)
    # another version adds rows; re-scoring a version replaces its rows, never duplicates them
    db.put([dict(rows[0], version="v0002", score=0.5)])
    db.put([dict(rows[0], version="v0002", score=0.25)])
    assert db.versions() == ["v0001", "v0002"] and db.count("v0002") == 1
    assert db.rows("v0002")[0]["score"] == 0.25 and db.count("v0001") == len(rows)


def test_cli_prints_worst_boxes_and_writes_csv_and_histogram(scored):
    tmp, reg, export, db, stats, _ = scored
    out_csv, out_png = tmp / "r" / "s.csv", tmp / "r" / "s.png"
    r = subprocess.run([sys.executable, "-m", "training.scores", "--project", "5", "--model-dir", str(reg.root),
                        "--version", "v0001", "--worst", "3", "--csv", str(out_csv), "--histogram", str(out_png)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = db.rows("v0001")
    lines = r.stdout.splitlines()
    assert f"{len(rows)} boxes" in lines[0]
    worst = lines[lines.index("3 worst boxes:") + 2: lines.index("3 worst boxes:") + 5]
    assert [float(l.split()[0]) for l in worst] == pytest.approx([round(x["score"], 3) for x in rows[:3]], abs=1e-3)
    with open(out_csv) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and float(got[0]["score"]) == pytest.approx(rows[0]["score"])
    assert set(got[0]) >= {"task", "region", "version", "label", "score", "x0", "y1"}
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.size == (600, 350)
        px = np.asarray(im.convert("L"))
    assert px.std() > 10  # bars were drawn


def test_cli_without_scores_exits_3(tmp_path):
    r = subprocess.run([sys.executable, "-m", "training.scores", "--project", "77", "--model-dir", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "no S_k scores" in r.stderr
