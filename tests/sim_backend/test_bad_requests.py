"""Bad requests to the backend: each gets a clear 400, a per-task error or a skipped region, never a crashed batch."""
import logging
import socket

import pytest

from sim_backend.app import create_app
from sim_backend.settings import Settings
from tests.support import COCO_VAL_IMAGES, DATA_ROOTS, coco_boxes, coco_config, coco_val, rect_item

IMAGE_ID = 139
PATH = str(COCO_VAL_IMAGES / "000000000139.jpg")
W, H = 640, 426


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return create_app(Settings(model_dir=tmp_path_factory.mktemp("models"), local_files_roots=DATA_ROOTS,
                               image_hosts_allowed=("127.0.0.1",))).test_client()


def _good_rect(rid="ok"):
    label, xywh, _ = coco_boxes(IMAGE_ID, min_area=2000)[0]
    return rect_item(label, xywh, W, H, rid=rid)


def _interactive(client, rects, data=None, config=None):
    payload = {"label_config": config or coco_config(), "project": 3,
               "tasks": [{"id": 1, "data": data if data is not None else {"image": PATH}}],
               "params": {"context": {"result": rects}}}
    r = client.post("/predict", json=payload)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("body,message", [
    ("{not json", "not valid JSON"),
    ("", "empty"),
    ("[1, 2]", "must be a JSON object"),
    ('{"label_config": "<View/>"}', "no tasks"),
    ('{"tasks": [], "label_config": "<View/>"}', "no tasks"),
    ('{"tasks": [1, 2]}', "JSON object"),
    ('{"tasks": [{"id": 1, "data": {}}]}', "no 'label_config'"),
])
def test_malformed_requests_get_400_with_a_message(client, body, message):
    r = client.post("/predict", data=body, content_type="application/json")
    assert r.status_code == 400
    assert message in r.get_json()["error"]


def test_config_without_mask_target_is_400(client):
    cfg = '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image"><Label value="tv"/></RectangleLabels></View>'
    r = client.post("/predict", json={"label_config": cfg, "tasks": [{"id": 1, "data": {"image": PATH}}]})
    assert r.status_code == 400 and "mask target" in r.get_json()["error"]
    r = client.post("/setup", json={"project": "3.17", "schema": cfg})
    assert r.status_code == 400 and "mask target" in r.get_json()["error"]


def test_task_without_image_and_unreachable_image_do_not_sink_the_batch(client, caplog):
    label, xywh, _ = coco_boxes(IMAGE_ID, min_area=2000)[0]
    ann = [{"id": 5, "result": [rect_item(label, xywh, W, H)]}]
    tasks = [
        {"id": 1, "data": {"text": "no image here"}, "annotations": ann},
        {"id": 2, "data": {"image": f"http://127.0.0.1:{_free_port()}/gone.jpg"}, "annotations": ann},
        {"id": 3, "data": {"image": PATH}, "annotations": ann},
        {"id": 4, "data": {"image": str(COCO_VAL_IMAGES / "missing.jpg")}, "annotations": ann},
    ]
    with caplog.at_level(logging.ERROR, logger="sim_backend"):
        r = client.post("/predict", json={"label_config": coco_config(), "tasks": tasks})
    assert r.status_code == 200
    body = r.get_json()
    assert len(body["results"]) == 4
    assert [bool(x["result"]) for x in body["results"]] == [False, False, True, False]
    assert all(x["model_version"] == "grabcut-v1" for x in body["results"])
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert "has no image field" in errors[1] and "'image'" in errors[1]
    assert "cannot fetch" in errors[2]
    assert "cannot read image file" in errors[4]
    assert 3 not in errors
    assert [x.get("error") for x in body["results"]] == [errors[1], errors[2], None, errors[4]]
    logged = caplog.text
    assert "task 1: no prediction" in logged and "task 2: no prediction" in logged


def test_broken_and_oversized_images_are_per_task_errors(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    client = create_app(Settings(model_dir=tmp_path, max_image_pixels=500 * 500,
                                 local_files_roots=DATA_ROOTS + (tmp_path.resolve(),))).test_client()
    label, xywh, _ = coco_boxes(802, min_area=2000)[0]   # 000000000802.jpg is 424 x 640 > 500*500
    w, h = 424, 640
    ann = [{"id": 1, "result": [rect_item(label, xywh, w, h)]}]
    small = coco_val().loadImgs(11813)[0]                 # 333 x 500 fits
    l2, b2, _ = coco_boxes(11813, min_area=2000)[0]
    tasks = [{"id": 1, "data": {"image": str(tmp_path / "broken.jpg")}, "annotations": ann},
             {"id": 2, "data": {"image": str(COCO_VAL_IMAGES / "000000000802.jpg")}, "annotations": ann},
             {"id": 3, "data": {"image": str(COCO_VAL_IMAGES / small["file_name"])},
              "annotations": [{"id": 2, "result": [rect_item(l2, b2, small["width"], small["height"])]}]}]
    body = client.post("/predict", json={"label_config": coco_config(), "tasks": tasks}).get_json()
    assert [bool(x["result"]) for x in body["results"]] == [False, False, True]
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert "not a readable image" in errors[1]
    assert "above MAX_IMAGE_PIXELS" in errors[2]


def test_zero_area_box_is_skipped_and_the_others_kept(client):
    zero = rect_item("tv", (100, 100, 0, 50), W, H, rid="zero")
    body = _interactive(client, [zero, _good_rect()])
    assert [s["region"] for s in body["skipped"]] == ["zero"]
    assert "zero area" in body["skipped"][0]["reason"]
    assert body["results"][0]["result"], "the good box still gets its regions"


def test_box_outside_the_image_is_skipped(client):
    outside = rect_item("tv", (700, 10, 50, 50), W, H, rid="out")   # x from 700 px in a 640 px wide image
    body = _interactive(client, [outside])
    assert body["results"][0]["result"] == []
    assert body["skipped"][0]["region"] == "out" and "outside the 640x426 image" in body["skipped"][0]["reason"]


def test_box_partly_outside_is_clipped_to_the_image(client):
    label, (x, y, w, h), _ = coco_boxes(IMAGE_ID, min_area=2000)[0]
    body = _interactive(client, [rect_item(label, (x, y, W - x + 80, h), W, H)])   # runs 80 px past the right edge
    assert body["skipped"] == []
    pts = [p for r in body["results"][0]["result"] if r["type"] == "polygonlabels" for p in r["value"]["points"]]
    assert pts and max(p[0] for p in pts) <= 100.0


def test_unknown_label_is_skipped_with_its_reason(client):
    cfg = coco_config(labels=["tv", "chair"])
    # the box control offers "zebra", the mask controls do not
    cfg = cfg.replace('<RectangleLabels name="box" toName="image">',
                      '<RectangleLabels name="box" toName="image"><Label value="zebra"/>')
    zebra = rect_item("zebra", (100, 100, 80, 80), W, H, rid="z")
    body = _interactive(client, [zebra], config=cfg)
    assert body["results"][0]["result"] == []
    assert body["skipped"][0]["region"] == "z" and "unknown label 'zebra'" in body["skipped"][0]["reason"]


def test_label_missing_only_in_brush_still_gets_a_polygon(client):
    label, xywh, _ = coco_boxes(IMAGE_ID, min_area=2000)[0]
    cfg = ('<View><Image name="image" value="$image"/>'
           f'<RectangleLabels name="box" toName="image"><Label value="{label}"/></RectangleLabels>'
           f'<PolygonLabels name="poly" toName="image"><Label value="{label}"/></PolygonLabels>'
           '<BrushLabels name="brush" toName="image"><Label value="other"/></BrushLabels></View>')
    body = _interactive(client, [rect_item(label, xywh, W, H)], config=cfg)
    types = {r["type"] for r in body["results"][0]["result"]}
    assert types == {"polygonlabels"}


def test_rectangle_from_unknown_control_or_without_label_is_skipped(client):
    other = dict(_good_rect("o"), from_name="not_in_config")
    nolabel = _good_rect("n")
    nolabel["value"] = dict(nolabel["value"], rectanglelabels=[])
    body = _interactive(client, [other, nolabel])
    reasons = {s["region"]: s["reason"] for s in body["skipped"]}
    assert "unknown control 'not_in_config'" in reasons["o"] and reasons["n"].startswith("rectangle has no label")
    assert body["results"][0]["result"] == []


def test_context_without_rectangles_gives_an_empty_result(client):
    kp = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "value": {"x": 1, "y": 1}}
    body = _interactive(client, [kp])
    assert body["results"] == [{"result": [], "score": 0.0, "model_version": "grabcut-v1"}]
    assert body["errors"] == [] and body["skipped"] == []


def test_blob_import_undefined_data_key_is_read(client):
    body = _interactive(client, [_good_rect()], data={"$undefined$": PATH})
    assert body["results"][0]["result"] and body["errors"] == []
