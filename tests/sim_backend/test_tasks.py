"""One rule per Label Studio field (sim_backend.tasks), shared by /predict and training's export."""
import numpy as np
import pytest

from sim_backend.tasks import (latest_annotation, parse_project_id, parse_regions, rectangles_of_task,
                               task_image_url)
from tests.support import rect_item


def test_latest_annotation_compares_times_not_strings():
    task = {"annotations": [
        # 10:00 at UTC+2 is 08:00 UTC: earlier than 09:30 UTC although its string sorts later
        {"id": 1, "updated_at": "2026-01-01T10:00:00+02:00", "result": [{"a": 1}]},
        {"id": 2, "updated_at": "2026-01-01T09:30:00Z", "result": [{"b": 2}]},
        {"id": 3, "updated_at": "2026-01-02T00:00:00Z", "result": [], "was_cancelled": True},
    ]}
    assert latest_annotation(task)["id"] == 2
    # ties on updated_at fall back to created_at, then to the id
    tie = {"annotations": [{"id": 5, "updated_at": "2026-01-01T00:00:00Z", "created_at": "2025-01-01T00:00:00Z"},
                           {"id": 4, "updated_at": "2026-01-01T00:00:00Z", "created_at": "2025-06-01T00:00:00Z"},
                           {"id": 9, "updated_at": "2026-01-01T00:00:00Z", "created_at": "2025-06-01T00:00:00Z"}]}
    assert latest_annotation(tie)["id"] == 9
    assert latest_annotation({"annotations": []}) is None and latest_annotation({}) is None


def test_an_empty_latest_annotation_counts_for_predict_and_export():
    """The annotator's latest word wins even when it removed every region: /predict segments nothing and the
    export does not train on the older boxes."""
    old = {"id": 1, "updated_at": "2026-01-01T00:00:00Z", "result": [rect_item("cat", [1, 1, 5, 5], 10, 10)]}
    new = {"id": 2, "updated_at": "2026-02-01T00:00:00Z", "result": []}
    task = {"annotations": [old, new]}
    assert latest_annotation(task) is new
    assert rectangles_of_task(task) == ([], "annotation 2")
    assert rectangles_of_task({"annotations": [old]})[0] == old["result"]


def test_rectangles_fall_back_to_the_latest_prediction_with_rectangles():
    rect = rect_item("cat", [1, 1, 5, 5], 10, 10)
    task = {"predictions": [{"id": 7, "created_at": "2026-01-01T00:00:00Z", "result": [rect]},
                            {"id": 8, "created_at": "2026-03-01T00:00:00Z",
                             "result": [{"type": "polygonlabels", "value": {}}]}]}
    assert rectangles_of_task(task) == ([rect], "prediction 7")
    assert rectangles_of_task({"id": 3}) == ([], "none")


@pytest.mark.parametrize("value, expected", [
    ("12.1700000000", "12"), (12, "12"), ("12", "12"), ({"id": 12, "title": "x"}, "12"), (None, None), ("", None),
    ({"title": "no id"}, None),
])
def test_project_ids(value, expected):
    assert parse_project_id(value) == expected


@pytest.mark.parametrize("value", ["abc", "-3", "1e9", [1], True, "9" * 40])
def test_bad_project_ids_are_refused(value):
    with pytest.raises(ValueError, match="not a Label Studio project id"):
        parse_project_id(value)


def test_task_image_url_reads_the_config_key_then_undefined():
    assert task_image_url({"image": "/a.jpg", "$undefined$": "/b.jpg"}, "image") == "/a.jpg"
    assert task_image_url({"$undefined$": "/b.jpg"}, "image") == "/b.jpg"
    assert task_image_url({"other": 1}, "image") is None and task_image_url("nope", "image") is None


def test_parse_regions_boxes_masks_and_matching():
    w, h = 100, 80
    rect = rect_item("cat", [10, 10, 30, 20], w, h, rid="r1")
    matched = {"id": "p1", "type": "polygonlabels", "to_name": "image", "value": {
        "points": [[10.5, 13.125], [39.5, 13.125], [39.5, 36.875], [10.5, 36.875]], "polygonlabels": ["cat"]}}
    alone = {"id": "p2", "type": "polygonlabels", "to_name": "image", "value": {
        "points": [[70.5, 70.625], [89.5, 70.625], [89.5, 86.875]], "polygonlabels": ["dog"]}}
    warnings = []
    regions = parse_regions([rect, matched, alone, {"id": "x", "type": "rectanglelabels", "value": {}}, "junk"],
                            w, h, "image", warnings.append)
    assert [r.region_id for r in regions] == ["r1", "p1", "p2"]
    r1, p1, p2 = regions
    assert r1.kind == "rectangle" and r1.train and np.allclose(r1.box, [10, 10, 40, 30])
    assert p1.kind == "polygon" and p1.mask.shape == (h, w) and not p1.train  # its rectangle trains instead
    assert np.allclose(p1.box, [10, 10, 40, 30])  # the tight box of the mask
    assert p2.train  # a mask without a rectangle gives a training box
    assert len(warnings) == 2 and "no label" in warnings[0] and "not an object" in warnings[1]
