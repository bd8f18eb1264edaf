"""Label Studio export on real coco-mini train2017 images and annotations, shaped as Label Studio tasks.

The tasks are what Label Studio returns from ``GET /api/tasks?fields=all`` (rectangles and polygons in
percent of the image); the images are read through the backend's ImageLoader from local paths. The same
export against a running Label Studio is covered by tests/e2e/test_retrain_e2e.py.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util
import pytest
from detectron2.data.datasets import load_coco_json
from pycocotools.coco import COCO

from sim_backend.images import ImageLoader
from sim_backend.settings import Settings
from sim_model.registry import ModelRegistry
from sim_backend.label_studio import LabelStudioConnection, LabelStudioUnavailable
from tests.support import (COCO_TRAIN_IMAGES, DATA_ROOTS, coco_config, coco_train, coco_train_labels, make_tasks, poly_item,
                           rect_item)
from training import ls_export
from training.coco import MASK_SUPERVISED_KEY, held_out

@pytest.fixture()
def loader(tmp_path):
    return ImageLoader(Settings(image_cache_bytes=0, local_files_roots=DATA_ROOTS + (tmp_path.resolve(),)))


def _export(tasks, tmp_path, loader, labels=None):
    reg = ModelRegistry(tmp_path / "models")
    return ls_export.export_tasks(tasks, coco_config(labels=labels or coco_train_labels()), 9, tmp_path / "cache", reg, loader,
                                  progress=lambda m: None), reg


def test_export_builds_coco_train_boxes_and_val_masks(tmp_path, loader):
    tasks, truth = make_tasks()
    export, reg = _export(tasks, tmp_path, loader)
    train_json, val_json = export.write_coco(tmp_path / "ds")
    train = json.loads(train_json.read_text())
    n_rect = sum(1 for t in tasks for r in t["annotations"][0]["result"] if r["type"] == "rectanglelabels")
    n_poly = sum(1 for t in tasks for r in t["annotations"][0]["result"] if r["type"] == "polygonlabels")
    assert n_poly >= 3
    # every rectangle is a training box; polygons drawn over a rectangle add none
    assert len(train["annotations"]) == n_rect == export.n_boxes
    assert all("segmentation" not in a for a in train["annotations"])
    labels = export.labels
    for a in train["annotations"]:
        gt = truth[a["ls_region_id"]]
        assert np.allclose(a["bbox"], gt["bbox"], atol=1e-6)
        assert labels[a["category_id"] - 1] == coco_train().loadCats(gt["category_id"])[0]["name"]
    # the categories list the whole class map, ids = class id + 1 (detectron2 contiguous ids = class ids)
    assert [c["id"] for c in train["categories"]] == list(range(1, len(labels) + 1))
    assert labels == reg.load_class_map(9)

    # validation: the annotators' polygons as masks, close to coco's own rasterisation
    val = COCO(str(val_json))
    assert len(val.getAnnIds()) == n_poly == export.n_masks
    ious = []
    for a in val.loadAnns(val.getAnnIds()):
        gt = coco_train().annToMask(truth[a["ls_region_id"]]).astype(bool)
        m = val.annToMask(a).astype(bool)
        ious.append(np.logical_and(m, gt).sum() / np.logical_or(m, gt).sum())
        x, y, w, h = a["bbox"]  # tight box of the mask
        ys, xs = np.nonzero(m)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.mean(ious) > 0.9 and min(ious) > 0.75

    # the dataset loads in detectron2 as is
    dicts = load_coco_json(str(train_json), str(export.image_dir), dataset_name=None)
    assert sum(len(d["annotations"]) for d in dicts) == n_rect
    assert all(Path(d["file_name"]).is_file() for d in dicts)


def test_image_cache_is_incremental(tmp_path, loader):
    tasks, _ = make_tasks(n_images=4, polygons_on=0)
    export, _ = _export(tasks, tmp_path, loader)
    assert (export.downloaded, export.reused) == (4, 0)
    files = sorted(p.name for p in export.image_dir.iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in export.image_dir.iterdir()}
    export2, _ = _export(tasks, tmp_path, loader)
    assert (export2.downloaded, export2.reused) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in export2.image_dir.iterdir()} == mtimes
    # one task now points at another image: only that one is fetched, its old file goes
    other = sorted(coco_train().getImgIds())[10]
    tasks[1]["data"]["image"] = str(COCO_TRAIN_IMAGES / coco_train().loadImgs(other)[0]["file_name"])
    tasks[1]["updated_at"] = "2026-11-21T11:00:00Z"
    export3, _ = _export(tasks, tmp_path, loader)
    assert (export3.downloaded, export3.reused) == (1, 3)
    files3 = sorted(p.name for p in export3.image_dir.iterdir())
    assert len(files3) == 4 and files3 != files
    t1 = next(t for t in export3.tasks if t.task_id == tasks[1]["id"])
    info = coco_train().loadImgs(other)[0]
    assert (t1.width, t1.height) == (info["width"], info["height"])


def test_broken_tasks_are_skipped_with_a_message(tmp_path, loader):
    tasks, _ = make_tasks(n_images=7, polygons_on=1)
    tasks[0]["data"]["image"] = str(tmp_path / "missing.jpg")                        # unreadable image
    tasks[5]["data"]["image"] = "http://x:99999/a.jpg"                                # malformed URLs
    tasks[6]["data"]["image"] = "http://[::1/a.jpg"
    not_image = tmp_path / "not-an-image.jpg"
    not_image.write_text("hello")
    tasks[1]["data"]["image"] = str(not_image)                                        # not an image
    tasks[2]["data"] = {"img": "elsewhere"}                                           # wrong data key
    bad_region = {"id": "bad", "type": "polygonlabels", "to_name": "image",
                  "value": {"points": [[1, 1], [2, 2]], "polygonlabels": ["person"]}}
    tasks[3]["annotations"][0]["result"].append(bad_region)                           # malformed region
    # an older cancelled and a newer real annotation: the newest usable one is taken
    tasks[4]["annotations"].append({"id": 99, "was_cancelled": True, "updated_at": "2026-11-22T00:00:00Z",
                                    "result": [rect_item("dog", [0, 0, 10, 10], 100, 100, "x")]})
    tasks.append({"id": 7777, "data": {"image": "whatever"}, "annotations": []})      # unlabeled
    export, _ = _export(tasks, tmp_path, loader)
    by_id = {t.task_id: t for t in export.tasks}
    assert set(by_id) == {tasks[3]["id"], tasks[4]["id"]}
    msgs = " | ".join(m for _, m in export.skipped)
    assert "missing.jpg" in msgs and "not a readable image" in msgs and "no image in data['image']" in msgs
    assert "region bad" in msgs and msgs.count("malformed URL") == 2
    assert export.n_unlabeled == 1
    assert all(r.region_id != "x" for r in by_id[tasks[4]["id"]].regions)  # cancelled annotation ignored
    assert len(by_id[tasks[3]["id"]].boxes) == sum(
        1 for r in tasks[3]["annotations"][0]["result"] if r["type"] == "rectanglelabels")


def test_polygon_without_a_box_trains_and_class_map_grows_stably(tmp_path, loader):
    tasks, truth = make_tasks(n_images=3, polygons_on=1)
    export1, reg = _export(tasks, tmp_path, loader, labels=coco_train_labels())
    labels1 = list(export1.labels)
    # the annotator draws a polygon of a new class, with no rectangle around it
    t = tasks[2]
    w, h = export1.tasks[2].width, export1.tasks[2].height
    t["annotations"].append({"id": 77, "result": t["annotations"][0]["result"] + [
        poly_item("zz-new-class", [10, 10, 60, 12, 55, 70, 12, 60], w, h, "pnew")],
        "updated_at": "2026-11-21T12:00:00Z"})
    export2, _ = ls_export.export_tasks(tasks, coco_config(labels=coco_train_labels() + ["zz-new-class"]), 9,
                                        tmp_path / "cache", reg, loader, progress=lambda m: None), None
    assert export2.labels[: len(labels1)] == labels1 and export2.labels[len(labels1):] == ["zz-new-class"]
    task2 = next(x for x in export2.tasks if x.task_id == t["id"])
    new = next(r for r in task2.regions if r.region_id == "pnew")
    assert new.train and new.mask is not None and np.allclose(new.box, [10, 10, 60, 70], atol=1.5)
    train = export2.coco_train()
    cat = {c["name"]: c["id"] for c in train["categories"]}
    assert cat["zz-new-class"] == len(labels1) + 1
    assert any(a["ls_region_id"] == "pnew" and a["category_id"] == cat["zz-new-class"] for a in train["annotations"])


def test_label_studio_down_aborts_the_export(tmp_path):
    """A Label Studio URL on a port where nothing listens: the export stops with LabelStudioUnavailable."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}"
    loader = ImageLoader(Settings(label_studio_url=url, label_studio_api_key="k", image_cache_bytes=0,
                                  image_fetch_timeout_s=2))
    tasks, _ = make_tasks(n_images=2, polygons_on=0)
    tasks[1]["data"]["image"] = "/data/upload/9/x.jpg"
    with pytest.raises(LabelStudioUnavailable, match="stopped answering.*task 1001"):
        _export(tasks, tmp_path, loader)
    with pytest.raises(LabelStudioUnavailable, match="does not answer"):
        ls_export.export_project(9, LabelStudioConnection(url, "k", timeout=2), tmp_path / "cache",
                                 ModelRegistry(tmp_path / "m"))


def test_annotators_masks_split_once_into_teaching_and_validating(tmp_path, loader):
    tasks, truth = make_tasks(n_images=6, polygons_on=3)
    export, _ = _export(tasks, tmp_path, loader)
    assert export.n_masks >= 6
    train_json, val_json = export.write_coco(tmp_path / "ds", 0.5)
    train, val = json.loads(train_json.read_text()), json.loads(val_json.read_text())
    supervised = [a for a in train["annotations"] if a.get(MASK_SUPERVISED_KEY)]
    held = {a["ls_region_id"] for a in val["annotations"]}
    # every mask is on exactly one side; those that teach supervise the rectangle they outline
    assert supervised and held and len(supervised) + len(held) == export.n_masks
    assert len(train["annotations"]) == export.n_boxes  # no instance twice
    outlines = {r.region_id: r.outlines for t in export.tasks for r in t.masks}
    teaching = {rid for rid in outlines if rid not in held}
    assert {a["ls_region_id"] for a in supervised} == {outlines[rid] for rid in teaching}
    for a in supervised:
        poly = next(rid for rid in teaching if outlines[rid] == a["ls_region_id"])
        m = mask_util.decode(a["segmentation"]).astype(bool)
        gt = coco_train().annToMask(truth[poly]).astype(bool)
        assert (m & gt).sum() / (m | gt).sum() > 0.9
    # the split is a property of the masks: the same on the next export, with more tasks too
    more, _ = _export(make_tasks(n_images=8, polygons_on=4)[0], tmp_path / "again", loader)
    assert held <= {rid for _, rid in more.validation_masks(0.5)}
    assert all(held_out(t, rid, 0.5) for t, rid in export.validation_masks(0.5))
    # all held out: training sees boxes only
    train_all = export.coco_train(1.0)
    assert not any(a.get(MASK_SUPERVISED_KEY) or "segmentation" in a for a in train_all["annotations"])
