"""Mask ↔ Label Studio regions (sim_backend.regions) on real coco-mini masks."""
import numpy as np
import pytest

from sim_backend.label_config import Control
from sim_backend.regions import (brush_region, brush_rle_to_mask, mask_regions, mask_to_polygons, pixels_to_percent,
                                 polygon_regions, polygons_to_mask, rectangle_to_xyxy)
from sim_model.box_to_mask import BoxMasks
from tests.support import coco_boxes, coco_val, iou

POLY = Control("poly", "polygonlabels", "image", ("cat", "tv"))
BRUSH = Control("brush", "brushlabels", "image", ("cat", "tv"))


def whole(mask: np.ndarray, score: float = 1.0) -> BoxMasks:
    """One mask over the whole image, as an engine answers for a box that covers it."""
    h, w = mask.shape
    return BoxMasks((h, w), np.array([[0, 0, w, h]]), (mask.astype(np.float32),), np.array([score], np.float32))


def _gt_masks(n=12):
    c = coco_val()
    out = []
    for img_id in sorted(c.getImgIds()):
        for label, box, m in coco_boxes(img_id, min_area=300):
            out.append(m)
            if len(out) == n:
                return out
    return out


def test_polygon_round_trip_keeps_real_coco_masks():
    ious_exact, ious_simpl = [], []
    for m in _gt_masks():
        h, w = m.shape
        for tol, acc in ((0.0, ious_exact), (1.0, ious_simpl)):
            polys = mask_to_polygons(m.astype(np.float32), tolerance_px=tol, min_region_px=16)
            back = polygons_to_mask([pixels_to_percent(p, w, h) for p in polys], w, h)
            # compare with the mask minus holes and specks the polygons cannot represent
            acc.append(iou(back, m))
    assert np.mean(ious_exact) > 0.97, ious_exact
    assert np.mean(ious_simpl) > 0.95, ious_simpl
    assert min(ious_simpl) > 0.85


def test_simplification_reduces_points():
    masks = _gt_masks()
    n0, n1, n3 = (sum(len(p) for m in masks for p in mask_to_polygons(m, tolerance_px=t)) for t in (0.0, 1.0, 3.0))
    assert n0 > n1 > n3 >= 3


def test_multi_part_mask_gives_several_polygon_regions_and_drops_specks():
    m = np.zeros((100, 200), np.float32)
    m[10:40, 10:60] = 0.9     # part 1
    m[50:90, 120:190] = 0.8   # part 2 (largest)
    m[5, 150] = 1.0           # a 1-pixel speck
    regions = polygon_regions(whole(m, 0.7), 0, "cat", POLY, threshold=0.5, tolerance_px=1.0, min_region_px=16)
    assert len(regions) == 2
    for r in regions:
        assert r["type"] == "polygonlabels" and r["value"]["polygonlabels"] == ["cat"]
        assert r["from_name"] == "poly" and r["to_name"] == "image" and r["score"] == pytest.approx(0.7)
        assert (r["original_width"], r["original_height"]) == (200, 100)
    back = polygons_to_mask([r["value"]["points"] for r in regions], 200, 100)
    assert iou(back, m >= 0.5) > 0.99
    # largest part first
    assert polygons_to_mask([regions[0]["value"]["points"]], 200, 100)[70, 150]


def test_tiny_mask_keeps_its_only_part():
    m = np.zeros((50, 50), np.float32)
    m[20:22, 30:33] = 1.0  # 6 pixels, below min_region_px but the only part
    polys = mask_to_polygons(m, min_region_px=16)
    assert len(polys) == 1
    assert polygons_to_mask([pixels_to_percent(polys[0], 50, 50)], 50, 50)[20:22, 30:33].all()


def test_empty_mask_gives_no_region():
    m = np.full((30, 30), 0.2, np.float32)
    assert polygon_regions(whole(m), 0, "cat", POLY, threshold=0.5, tolerance_px=1, min_region_px=4) == []
    assert brush_region(whole(m), 0, "cat", BRUSH, threshold=0.5) is None
    assert mask_regions(whole(m), 0, "cat", [POLY, BRUSH], threshold=0.5, tolerance_px=1, min_region_px=4) == []


def test_polygons_touching_the_border_are_clipped_to_the_image():
    m = np.ones((40, 60), np.float32)
    pts = mask_to_polygons(m)[0]
    pct = np.array(pixels_to_percent(pts, 60, 40))
    assert pct.min() >= 0.0 and pct.max() <= 100.0
    # vertices are the centres of the boundary pixels: half a pixel inside the image edges
    assert pct[:, 0].min() == pytest.approx(50 / 60, abs=1e-3) and pct[:, 0].max() == pytest.approx(100 - 50 / 60, abs=1e-3)
    assert polygons_to_mask([pct], 60, 40).all()
    # out-of-range pixel coordinates are clipped
    assert pixels_to_percent(np.array([[-5.0, -5.0], [100.0, 3.0], [3.0, 100.0]]), 60, 40) == [
        [0.0, 0.0], [100.0, 8.75], [5.8333, 100.0]]


def test_brush_rle_decodes_back_with_label_studio_sdk_to_the_same_mask():
    m = _gt_masks(3)[2]
    h, w = m.shape
    r = brush_region(whole(m, 0.6), 0, "tv", BRUSH, threshold=0.5)
    assert r["type"] == "brushlabels" and r["value"]["format"] == "rle" and r["value"]["brushlabels"] == ["tv"]
    from label_studio_sdk.converter import brush
    decoded = np.asarray(brush.decode_rle(r["value"]["rle"])).reshape(h, w, 4)[:, :, 3] > 0
    assert np.array_equal(decoded, m)
    assert np.array_equal(brush_rle_to_mask(r["value"]["rle"], w, h), m)


def test_rectangle_to_xyxy_plain_and_rotated():
    v = {"x": 10, "y": 20, "width": 50, "height": 25, "rotation": 0}
    assert rectangle_to_xyxy(v, 200, 100).tolist() == [20.0, 20.0, 120.0, 45.0]
    v90 = dict(v, rotation=90)  # clockwise about the top-left corner: the box hangs down-left
    assert np.allclose(rectangle_to_xyxy(v90, 200, 100), [20 - 25, 20, 20, 20 + 100])
    with pytest.raises(ValueError):
        rectangle_to_xyxy({"x": 1}, 10, 10)


def test_box_local_masks_give_the_regions_of_the_pasted_mask():
    """A crop traced at its offset gives the same polygons as the whole-image mask, also where the object
    touches the crop's edge; the brush RLE covers the whole image."""
    for m in _gt_masks(6):
        h, w = m.shape
        ys, xs = np.nonzero(m)
        c0, r0, c1, r1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # the tight box: parts touch its edges
        crop = BoxMasks((h, w), np.array([[c0, r0, c1, r1]]), (m[r0:r1, c0:c1].astype(np.float32),),
                        np.array([0.9], np.float32))
        for tol in (0.0, 1.0):
            a = [p.tolist() for p in mask_to_polygons(m, tolerance_px=tol)]
            b = [p.tolist() for p in mask_to_polygons(crop.crops[0], tolerance_px=tol, offset=(c0, r0))]
            assert a == b
        regions = mask_regions(crop, 0, "tv", [POLY, BRUSH], threshold=0.5, tolerance_px=1.0, min_region_px=16)
        assert [r["type"] for r in regions][-1] == "brushlabels" and all(r["score"] == pytest.approx(0.9)
                                                                          for r in regions)
        assert np.array_equal(brush_rle_to_mask(regions[-1]["value"]["rle"], w, h), m)
        whole_regions = mask_regions(whole(m, 0.9), 0, "tv", [POLY], threshold=0.5, tolerance_px=1.0,
                                     min_region_px=16)
        assert [r["value"] for r in regions[:-1]] == [r["value"] for r in whole_regions]
    # a target without the box's label is passed over
    only_cat = Control("poly2", "polygonlabels", "image", ("cat",))
    assert mask_regions(whole(m), 0, "tv", [only_cat], threshold=0.5, tolerance_px=1, min_region_px=1) == []
