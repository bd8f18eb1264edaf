"""A real Label Studio 1.23.2, our backend under gunicorn, coco-mini val2017 photos.

One flow (module fixture ``flow``), then one test per promise:
20 val2017 images are imported through a Local Files storage, their ground-truth boxes become
annotations (label-studio-sdk), our backend is connected as the project's ML backend, "Retrieve
predictions" runs twice, one interactive request goes through Label Studio's own interactive API.
The stored polygons, decoded to masks, must beat the filled box against coco-mini's masks
(mean IoU over every ground-truth box, both figures computed here); predictions carry the
model_version that /setup returned, are not duplicated by the second run, and no annotation is written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
from pycocotools import mask as mask_utils

from sim_model.evaluation import mask_iou
from tests.support import box_mask
from tests.e2e import ls_harness as H

# e2e, not slow: ~20-60 s on 2 cores, and CI (scripts/test.sh deselects `slow`) must run it.
pytestmark = pytest.mark.e2e

N_IMAGES = 20



def gt_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """(h, w) bool ground-truth mask of a COCO annotation (polygons or RLE), with pycocotools."""
    seg = ann["segmentation"]
    rles = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else (
        mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg)
    rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
    return mask_utils.decode(rle).astype(bool)


def assign_to_boxes(regions: list[dict], anns: list[dict], names: dict[int, str], label_key: str,
                    h: int, w: int) -> dict[int, np.ndarray]:
    """Union of the decoded regions that belong to each ground-truth box.

    Region ids are the backend's own, so each region goes to the box of the same label that holds
    the largest share of its pixels (ties: the box it overlaps best). A wrong assignment can only
    lower the score measured here.

    Returns:
        {annotation id: (h, w) bool mask}, empty masks for boxes that got no region.
    """
    out = {a["id"]: np.zeros((h, w), bool) for a in anns}
    boxes = {a["id"]: box_mask(a["bbox"], w, h) for a in anns}
    for r in regions:
        m = H.region_mask(r)
        area = m.sum()
        if area == 0:
            continue
        label = r["value"][label_key][0]
        cands = [a for a in anns if names[a["category_id"]] == label]
        if not cands:
            continue
        best = max(cands, key=lambda a: ((m & boxes[a["id"]]).sum() / area, mask_iou(m, boxes[a["id"]])))
        out[best["id"]] |= m
    return out


@dataclass
class Flow:
    project: int
    ml_id: int
    tasks: dict[int, dict]                 # task id -> task
    task_image: dict[int, dict]            # task id -> COCO image record
    anns: dict[int, list[dict]]            # COCO image id -> its non-crowd annotations
    names: dict[int, str]
    setup_version: str
    ls_version: str
    annotations_before: int
    annotations_after: int
    first: list[dict]
    second: list[dict]
    after_interactive: list[dict]
    interactive: dict
    interactive_task: int
    interactive_ann: dict
    backend: H.BackendServer
    label_studio: H.LabelStudioServer
    timings: dict = field(default_factory=dict)

    def logs(self) -> str:
        """Tails of both servers' logs, for failure messages."""
        return (f"\n--- backend log ({self.backend.log_path}):\n{self.backend.tail_log(40)}"
                f"\n--- Label Studio log ({self.label_studio.log_path}):\n{self.label_studio.tail_log(40)}")


@pytest.fixture(scope="module")
def flow(label_studio, ls_client, start_backend, coco_val, tmp_path_factory) -> Flow:
    t_all = time.monotonic()
    coco = coco_val["json"]
    images = H.select_images(coco, N_IMAGES)
    folder = H.stage_images(images, coco_val["images"], label_studio.document_root / "coco-val2017-e2e")
    ids = {im["id"] for im in images}
    subset = {"images": images, "categories": coco["categories"],
              "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    config = H.labeling_config([c["name"] for c in coco["categories"]])

    client = ls_client
    project = H.create_project(client, "coco-mini val2017 e2e", config)
    H.add_local_files_storage(client, project, folder)
    tasks = {t["id"]: t for t in H.list_tasks(client, project)}
    assert len(tasks) == N_IMAGES, f"Local Files storage made {len(tasks)} tasks for {N_IMAGES} images"
    task_to_image = H.create_gt_box_annotations(client, project, subset)
    assert len(task_to_image) == N_IMAGES
    by_id = {im["id"]: im for im in images}
    anns = {i: [a for a in subset["annotations"] if a["image_id"] == i and not a.get("iscrowd", 0)] for i in ids}
    annotations_before = H.count_annotations(client, project)

    backend = start_backend(tmp_path_factory.mktemp("models"))
    # What /setup answers for this project (Label Studio sends the same payload when connecting).
    setup = requests.post(f"{backend.url}/setup", json={
        "project": f"{project}.{int(time.time())}", "schema": config, "hostname": label_studio.url,
        "access_token": label_studio.api_key}, timeout=60, auth=backend.auth)
    assert setup.status_code == 200, setup.text
    setup_version = setup.json()["model_version"]

    ml_id = H.connect_ml_backend(client, project, backend.url, basic_auth=backend.auth)
    ls_version = H.ml_backend_model_version(client, ml_id)

    t0 = time.monotonic()
    H.retrieve_predictions(client, project, sorted(tasks))
    t_retrieve = time.monotonic() - t0
    first = H.list_predictions(client, project)
    t0 = time.monotonic()
    H.retrieve_predictions(client, project, sorted(tasks))
    t_retrieve2 = time.monotonic() - t0
    second = H.list_predictions(client, project)

    # Interactive: the annotator draws the largest ground-truth box of the first task.
    tid = min(tasks)
    img = by_id[task_to_image[tid]]
    ann = max(anns[img["id"]], key=lambda a: a["area"])
    drawn = next(r for r in H.coco_box_results(subset, img["id"]) if r["id"] == f"gt{ann['id']}")
    drawn = dict(drawn, id="drawn1", origin="manual")
    t0 = time.monotonic()
    interactive = H.interactive_predict(label_studio, ml_id, tid, {"result": [drawn]})
    t_inter = time.monotonic() - t0
    after_interactive = H.list_predictions(client, project)
    annotations_after = H.count_annotations(client, project)

    f = Flow(project, ml_id, tasks, {t: by_id[i] for t, i in task_to_image.items()}, anns, names,
             setup_version, ls_version, annotations_before, annotations_after, first, second,
             after_interactive, interactive, tid, ann, backend, label_studio,
             {"retrieve_s": t_retrieve, "retrieve_again_s": t_retrieve2, "interactive_s": t_inter,
              "flow_s": time.monotonic() - t_all})
    print(f"\n[e2e] timings: {f.timings}; backend log {backend.log_path}; LS log {label_studio.log_path}")
    return f


def _by_task(preds: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in preds:
        out.setdefault(p["task"], []).append(p)
    return out


def test_every_task_gets_one_prediction_with_the_setup_model_version(flow):
    assert flow.setup_version, "/setup returned an empty model_version"
    assert flow.ls_version == flow.setup_version, "Label Studio recorded another model_version than /setup returns"
    per_task = _by_task(flow.first)
    assert sorted(per_task) == sorted(flow.tasks), f"tasks without a stored prediction: " \
        f"{sorted(set(flow.tasks) - set(per_task))}{flow.logs()}"
    for tid, preds in per_task.items():
        assert len(preds) == 1, f"task {tid}: {len(preds)} predictions after one Retrieve"
        p = preds[0]
        assert p["model_version"] == flow.setup_version
        assert p["score"] is not None and 0.0 <= p["score"] <= 1.0
        polys = H.regions_by_type(p["result"], "polygonlabels")
        assert polys, f"task {tid}: no polygon region"
        assert all(0.0 <= r["score"] <= 1.0 for r in p["result"])


def test_polygons_beat_the_filled_box_against_coco_masks(flow):
    ious, floor = [], []
    for tid, (pred,) in _by_task(flow.first).items():
        img = flow.task_image[tid]
        h, w = img["height"], img["width"]
        anns = flow.anns[img["id"]]
        polys = H.regions_by_type(pred["result"], "polygonlabels")
        for r in polys:
            assert (r["original_width"], r["original_height"]) == (w, h)
            pts = np.asarray(r["value"]["points"])
            assert pts.min() >= 0.0 and pts.max() <= 100.0, "polygon points outside the image"
        masks = assign_to_boxes(polys, anns, flow.names, "polygonlabels", h, w)
        for a in anns:
            g = gt_mask(a, h, w)
            ious.append(mask_iou(masks[a["id"]], g))
            floor.append(mask_iou(box_mask(a["bbox"], w, h), g))
    miou, mbox = float(np.mean(ious)), float(np.mean(floor))
    print(f"\n[e2e] {len(ious)} boxes on {len(flow.tasks)} images: stored polygons mIoU {miou:.3f}, "
          f"filled box {mbox:.3f}")
    assert len(ious) >= N_IMAGES
    assert miou > mbox, f"polygons mIoU {miou:.3f} does not beat the filled box {mbox:.3f}"


def test_brush_regions_match_the_polygons(flow):
    agree = []
    for tid, (pred,) in _by_task(flow.first).items():
        img = flow.task_image[tid]
        h, w = img["height"], img["width"]
        anns = flow.anns[img["id"]]
        brushes = H.regions_by_type(pred["result"], "brushlabels")
        assert len(brushes) == len(anns), f"task {tid}: {len(brushes)} brush regions for {len(anns)} boxes"
        by_brush = assign_to_boxes(brushes, anns, flow.names, "brushlabels", h, w)
        by_poly = assign_to_boxes(H.regions_by_type(pred["result"], "polygonlabels"), anns, flow.names,
                                  "polygonlabels", h, w)
        agree += [mask_iou(by_brush[a["id"]], by_poly[a["id"]]) for a in anns]
    assert float(np.mean(agree)) > 0.85, f"brush and polygon masks disagree: mean IoU {np.mean(agree):.3f}"


def test_retrieving_again_does_not_duplicate(flow):
    key = lambda p: (p["task"], p["id"])  # noqa: E731
    assert sorted(map(key, flow.second)) == sorted(map(key, flow.first)), \
        "the second Retrieve predictions changed the stored predictions"
    assert {p["model_version"] for p in flow.second} == {flow.setup_version}


def test_interactive_request_through_label_studio(flow):
    ans = flow.interactive
    assert "errors" not in ans or not ans["errors"], f"interactive request failed: {ans}{flow.logs()}"
    data = ans["data"]
    assert data["model_version"] == flow.setup_version
    polys = H.regions_by_type(data["result"], "polygonlabels")
    label = flow.names[flow.interactive_ann["category_id"]]
    assert polys and all(r["value"]["polygonlabels"] == [label] for r in polys)
    img = flow.task_image[flow.interactive_task]
    h, w = img["height"], img["width"]
    mask = np.zeros((h, w), bool)
    for r in polys:
        mask |= H.region_mask(r)
    box = box_mask(flow.interactive_ann["bbox"], w, h)
    assert mask.any() and (mask & ~box).sum() <= 0.02 * mask.sum(), "interactive mask leaves the drawn box"
    # Same engine, same box, same image: the interactive answer agrees with the batch prediction.
    (pred,) = _by_task(flow.first)[flow.interactive_task]
    batch = assign_to_boxes(H.regions_by_type(pred["result"], "polygonlabels"), flow.anns[img["id"]],
                            flow.names, "polygonlabels", h, w)[flow.interactive_ann["id"]]
    g = gt_mask(flow.interactive_ann, h, w)
    print(f"\n[e2e] interactive box: IoU with the batch mask {mask_iou(mask, batch):.3f}; with the ground truth "
          f"{mask_iou(mask, g):.3f} (batch {mask_iou(batch, g):.3f}, filled box {mask_iou(box, g):.3f})")
    assert mask_iou(mask, batch) > 0.9
    # Interactive answers are shown, not stored.
    assert len(flow.after_interactive) == len(flow.second)


def test_backend_never_writes_annotations(flow):
    assert flow.annotations_before == N_IMAGES
    assert flow.annotations_after == flow.annotations_before
