"""/predict through the Flask test client on real coco-mini val2017 images, with the real GrabCut engine."""
import numpy as np
import pytest

from sim_backend.app import create_app
from sim_backend.engines import EngineProvider
from sim_backend.regions import brush_rle_to_mask, polygons_to_mask
from sim_backend.settings import Settings
from sim_model.engines.grabcut import GrabCutBoxToMask
from tests.support import DATA_ROOTS, box_mask, coco_boxes, coco_config, coco_val, image_info, iou, rect_item, sample_boxes


class CountingGrabCut(GrabCutBoxToMask):
    """The real GrabCut engine, recording how it is called (to check one call per image)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def predict(self, image, boxes, labels):
        self.calls.append((image.shape, len(boxes), list(labels)))
        return super().predict(image, boxes, labels)


@pytest.fixture(scope="module")
def engine():
    return CountingGrabCut()


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    settings = Settings(model_dir=tmp_path_factory.mktemp("models"), local_files_roots=DATA_ROOTS)
    app = create_app(settings, EngineProvider(settings, fallback_factory=lambda: engine))
    return app.test_client()


def _polygon_mask(result, w, h):
    polys = [r["value"]["points"] for r in result if r["type"] == "polygonlabels"]
    return polygons_to_mask(polys, w, h)


def test_interactive_polygon_beats_the_filled_box(client, engine):
    ious, box_ious = [], []
    for img_id, label, xywh, gt in sample_boxes(6):
        path, w, h = image_info(img_id)
        payload = {"project": "7.1700000000", "label_config": coco_config(),
                   "tasks": [{"id": img_id, "data": {"image": path}}],
                   "params": {"context": {"result": [rect_item(label, xywh, w, h, rid="drawn")]}}}
        r = client.post("/predict", json=payload)
        assert r.status_code == 200, r.get_data(as_text=True)
        body = r.get_json()
        assert len(body["results"]) == 1
        res = body["results"][0]
        assert res["model_version"] == "grabcut-v1" and 0.0 <= res["score"] <= 1.0
        polys = [x for x in res["result"] if x["type"] == "polygonlabels"]
        brushes = [x for x in res["result"] if x["type"] == "brushlabels"]
        assert polys and len(brushes) == 1
        for x in polys + brushes:
            assert x["value"][x["type"]] == [label]
            assert (x["original_width"], x["original_height"]) == (w, h) and x["to_name"] == "image"
            assert 0.0 <= x["score"] <= 1.0
        for x in polys:
            pts = np.array(x["value"]["points"])
            assert x["value"]["closed"] is True and pts.shape[1] == 2 and len(pts) >= 3
            assert pts.min() >= 0.0 and pts.max() <= 100.0
        m = _polygon_mask(res["result"], w, h)
        # the brush region is the same mask as the polygons, up to simplification
        assert iou(brush_rle_to_mask(brushes[0]["value"]["rle"], w, h), m) > 0.9
        ious.append(iou(m, gt))
        box_ious.append(iou(box_mask(xywh, w, h), gt))
    assert np.mean(ious) > np.mean(box_ious), (ious, box_ious)
    assert engine.calls[-1][1] == 1


def test_batch_uses_latest_annotation_then_latest_prediction_one_engine_call_per_image(client, engine):
    cfg = coco_config(brush=False)
    img_a, img_b = sorted(coco_val().getImgIds())[:2]
    path_a, wa, ha = image_info(img_a)
    path_b, wb, hb = image_info(img_b)
    objs_a = coco_boxes(img_a, min_area=1000)
    objs_b = coco_boxes(img_b, min_area=1000)
    assert len(objs_a) >= 2 and objs_b
    latest = [rect_item(l, b, wa, ha, rid=f"a{i}") for i, (l, b, _) in enumerate(objs_a)]
    task_a = {"id": 1, "data": {"image": path_a}, "annotations": [
        {"id": 10, "created_at": "2026-01-01T10:00:00Z", "updated_at": "2026-01-01T10:00:00Z",
         "result": latest[:1], "was_cancelled": False},
        {"id": 11, "created_at": "2026-01-01T09:00:00Z", "updated_at": "2026-01-02T09:00:00Z",
         "result": latest, "was_cancelled": False},                      # updated last: wins
        {"id": 12, "created_at": "2026-01-03T09:00:00Z", "updated_at": "2026-01-03T09:00:00Z",
         "result": [], "was_cancelled": True}]}                          # cancelled: ignored
    own_polygons = {"id": 21, "created_at": "2026-01-05T00:00:00Z", "result": [
        {"type": "polygonlabels", "from_name": "poly", "to_name": "image", "value": {"points": [[1, 1], [2, 2], [1, 2]]}}]}
    task_b = {"id": 2, "data": {"image": path_b}, "annotations": [], "predictions": [
        {"id": 20, "created_at": "2026-01-01T00:00:00Z",
         "result": [rect_item(l, b, wb, hb, rid=f"b{i}") for i, (l, b, _) in enumerate(objs_b)]},
        own_polygons]}                                   # a later polygon-only prediction is passed over
    task_c = {"id": 3, "data": {"image": path_b}}        # nothing to segment
    # an engine that knows its pace (from any earlier call) gets every box of an image in one call while
    # the request's deadline allows (before its first call it gets one box first: predict_valid_box_chunks)
    engine.predict(np.zeros((8, 8, 3), np.uint8), np.array([[0, 0, 4, 4]], np.float32), ["tv"])
    engine.calls.clear()
    r = client.post("/predict", json={"project": 7, "label_config": cfg, "tasks": [task_a, task_b, task_c]})
    assert r.status_code == 200
    body = r.get_json()
    assert [len(x["result"]) > 0 for x in body["results"]] == [True, True, False]
    assert body["errors"] == [] and body["skipped"] == []
    # one engine call per image with all its boxes
    assert [c[1] for c in engine.calls] == [len(objs_a), len(objs_b)]
    assert engine.calls[0][2] == [l for l, _, _ in objs_a]
    for res, objs, w, h in ((body["results"][0], objs_a, wa, ha), (body["results"][1], objs_b, wb, hb)):
        assert all(x["type"] == "polygonlabels" for x in res["result"])   # no BrushLabels in this config
        assert {x["value"]["polygonlabels"][0] for x in res["result"]} == {l for l, _, _ in objs}
        assert res["model_version"] == "grabcut-v1" and 0 < res["score"] <= 1
        gt_union = np.any([m for _, _, m in objs], axis=0)
        assert iou(_polygon_mask(res["result"], w, h), gt_union) > 0.5


def test_polygon_tolerance_can_be_set_per_request(client):
    img_id, label, xywh, _ = sample_boxes(1, min_area=20000)[0]
    path, w, h = image_info(img_id)

    def n_points(tol):
        params = {"context": {"result": [rect_item(label, xywh, w, h)]}}
        if tol is not None:
            params["polygon_tolerance_px"] = tol
        body = client.post("/predict", json={"label_config": coco_config(brush=False),
                                             "tasks": [{"id": 1, "data": {"image": path}}], "params": params}).get_json()
        return sum(len(x["value"]["points"]) for x in body["results"][0]["result"])

    assert n_points(0) > n_points(None) > n_points(8)
    bad = client.post("/predict", json={"label_config": coco_config(), "tasks": [{"id": 1, "data": {"image": path}}],
                                        "params": {"polygon_tolerance_px": -1}})
    assert bad.status_code == 400 and "polygon_tolerance_px" in bad.get_json()["error"]
