"""Labeling config parsing (sim_backend.label_config) with label-studio-sdk."""
import pytest

from sim_backend.label_config import LabelConfigError, parse_label_config, target_label
from tests.support import coco_category_names, coco_config, labels_xml


def test_coco_config_binds_boxes_polygons_and_brush():
    cfg = parse_label_config(coco_config())
    assert len(cfg.bindings) == 1
    b = cfg.bindings[0]
    assert (b.image_name, b.value_key) == ("image", "image")
    assert [c.name for c in b.box_controls] == ["box"]
    assert b.polygon.name == "poly" and b.polygon.tag == "polygonlabels"
    assert b.brush.name == "brush" and b.brush.tag == "brushlabels"
    assert list(b.polygon.labels) == coco_category_names()
    assert cfg.binding_for_box_control("box") is b
    assert cfg.binding_for_box_control("nope") is None


def test_polygon_only_and_brush_only_configs_are_accepted():
    assert parse_label_config(coco_config(brush=False)).bindings[0].brush is None
    b = parse_label_config(coco_config(polygon=False)).bindings[0]
    assert b.polygon is None and b.brush is not None
    assert b.targets == (b.brush,)


def test_image_field_name_comes_from_value():
    xml = ('<View><Image name="img" value="$photo_url"/>' + labels_xml("RectangleLabels", "r", ["a"]).replace(
        'toName="image"', 'toName="img"') + labels_xml("PolygonLabels", "p", ["a"]).replace(
        'toName="image"', 'toName="img"') + '</View>')
    b = parse_label_config(xml).bindings[0]
    assert (b.image_name, b.value_key) == ("img", "photo_url")


def test_config_without_box_source_is_refused_naming_it():
    xml = '<View><Image name="image" value="$image"/>' + labels_xml("PolygonLabels", "poly", ["cat"]) + '</View>'
    with pytest.raises(LabelConfigError, match="RectangleLabels"):
        parse_label_config(xml)


def test_config_without_mask_target_is_refused_naming_it():
    xml = '<View><Image name="image" value="$image"/>' + labels_xml("RectangleLabels", "box", ["cat"]) + '</View>'
    with pytest.raises(LabelConfigError, match="no <PolygonLabels> or <BrushLabels> .mask target."):
        parse_label_config(xml)


def test_config_without_image_or_unparsable_is_refused():
    with pytest.raises(LabelConfigError, match="no <Image>"):
        parse_label_config('<View><Text name="t" value="$text"/></View>')
    with pytest.raises(LabelConfigError):
        parse_label_config("<View><Image name=")
    with pytest.raises(LabelConfigError, match="empty"):
        parse_label_config("  ")


def test_mask_target_on_another_image_does_not_count():
    xml = ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
           '<RectangleLabels name="box" toName="a"><Label value="cat"/></RectangleLabels>'
           '<PolygonLabels name="poly" toName="b"><Label value="cat"/></PolygonLabels></View>')
    with pytest.raises(LabelConfigError, match='Image name="a"> has no <PolygonLabels>'):
        parse_label_config(xml)


def test_box_label_maps_to_same_named_target_label():
    b = parse_label_config(coco_config(labels=["cat", "dog"])).bindings[0]
    assert target_label("cat", b.polygon) == "cat"
    assert target_label("zebra", b.polygon) is None
