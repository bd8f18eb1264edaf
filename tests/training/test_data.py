"""The training mapper on real data: box-centred crops (the close look's training views) and the masks
that annotators drew supervising only their own instances."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from sim_model.boxes import box_pixel_bounds, context_window
from sim_model.datasets import shared_data_dir, split_files
from training.coco import MASK_SUPERVISED_KEY
from training.data import BoxOnlyDatasetMapper, register_coco
from training.train import build_config

BALLOON = shared_data_dir() / "balloon"
TRAIN_JSON, TRAIN_IMAGES = split_files(BALLOON, "train")
pytestmark = pytest.mark.skipif(not TRAIN_JSON.exists(), reason=f"balloon not found at {BALLOON}")


def _dataset(tmp_path, supervised_ids=()):
    data = json.loads(TRAIN_JSON.read_text())
    image = data["images"][0]
    anns = [dict(a) for a in data["annotations"] if a["image_id"] == image["id"]]
    for a in anns:
        if a["id"] in supervised_ids:
            a[MASK_SUPERVISED_KEY] = True
    path = tmp_path / "one.json"
    path.write_text(json.dumps(dict(data, images=[image], annotations=anns)))
    from detectron2.data import DatasetCatalog
    name = register_coco(f"one_{abs(hash(str(path)))}", str(path), str(TRAIN_IMAGES))
    return DatasetCatalog.get(name)[0], anns, image


def _cfg(*opts):
    return build_config("configs/SIM_close_EffLite0_FPN_cpu.yaml", ["DATALOADER.NUM_WORKERS", "0", *opts],
                        train_json=str(TRAIN_JSON), train_images=str(TRAIN_IMAGES))


def test_context_window_holds_the_box_and_is_clipped():
    for box in ([10.2, 20.7, 50.1, 90.0], [0, 0, 5, 5], [600, 400, 640, 480]):
        x0, y0, x1, y1 = context_window(np.array(box), (480, 640), 1.5)
        c0, r0, c1, r1 = box_pixel_bounds(np.array(box), (480, 640))
        assert x0 <= c0 and y0 <= r0 and x1 >= c1 and y1 >= r1
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert context_window(np.array([100, 100, 140, 120]), (480, 640), 2.0) == (80, 90, 160, 130)
    with pytest.raises(ValueError):
        context_window(np.array([0, 0, 4, 4]), (10, 10), 0.9)


def test_box_crops_are_close_looks_at_one_box(tmp_path):
    d, anns, image = _dataset(tmp_path)
    mapper = BoxOnlyDatasetMapper(_cfg(), is_train=True)
    np.random.seed(0)
    sizes = set()
    for _ in range(6):
        out = mapper(d)
        h, w = out["image"].shape[1:]
        sizes.add(min(h, w))
        boxes = out["instances"].gt_boxes.tensor
        # one box nearly fills the view: its side over the view's is 1 / context (with jitter and clipping)
        fill = ((boxes[:, 2] - boxes[:, 0]) / w).max()
        assert 0.4 < float(fill) <= 1.0
        assert not out["instances"].has("gt_masks")  # no mask is supervised: boxes only
        assert not out["instances"].gt_mask_supervised.any()
    assert sizes <= {160, 192, 224} and min(image["width"], image["height"]) not in sizes


def test_only_marked_masks_supervise_and_follow_the_crop(tmp_path):
    data = json.loads(TRAIN_JSON.read_text())
    first = data["images"][0]["id"]
    ids = [a["id"] for a in data["annotations"] if a["image_id"] == first]
    d, anns, image = _dataset(tmp_path, supervised_ids=ids[:1])
    mapper = BoxOnlyDatasetMapper(_cfg("INPUT.BOX_CROP.PROB", "0.0", "INPUT.RANDOM_FLIP", "none",
                                       "INPUT.MIN_SIZE_TRAIN", "(512,)"), is_train=True)
    out = mapper(d)
    inst = out["instances"]
    assert inst.gt_mask_supervised.tolist() == [True] + [False] * (len(ids) - 1)
    masks = inst.gt_masks.tensor
    assert masks[1:].sum() == 0 and masks[0].sum() > 0
    # the supervised mask is the annotation's polygon, resized with the image
    h, w = out["image"].shape[1:]
    a = next(a for a in anns if a["id"] == ids[0])
    rle = mask_util.frPyObjects(a["segmentation"], image["height"], image["width"])
    full = torch.from_numpy(mask_util.decode(mask_util.merge(rle)).astype(np.float32))
    resized = torch.nn.functional.interpolate(full[None, None], size=(h, w), mode="nearest")[0, 0] > 0.5
    inter = (resized & masks[0]).sum().item()
    assert inter / (resized | masks[0]).sum().item() > 0.95


def test_boxes_that_the_view_cuts_are_not_tight(tmp_path):
    d, anns, image = _dataset(tmp_path)
    assert len(anns) >= 3  # neighbours that a close look at one balloon cuts
    np.random.seed(0)
    crops = BoxOnlyDatasetMapper(_cfg("INPUT.BOX_CROP.ENABLED", "True", "INPUT.BOX_CROP.PROB", "1.0",
                                      "INPUT.BOX_CROP.MASK_MIN_VISIBLE", "0.9"), is_train=True)
    n_cut = 0
    for _ in range(12):
        out = crops(d)
        inst, (h, w) = out["instances"], out["image"].shape[1:]
        tight, boxes = inst.gt_box_tight, inst.gt_boxes.tensor
        assert tight.dtype == torch.bool and len(tight) == len(inst)
        assert tight.any()  # the centred box is whole
        # a box that is not tight was clipped: it reaches the view's border
        on_border = (boxes[:, 0] <= 0) | (boxes[:, 1] <= 0) | (boxes[:, 2] >= w) | (boxes[:, 3] >= h)
        assert bool(on_border[~tight].all())
        n_cut += int((~tight).sum())
    assert n_cut > 0
    # whole images cut nothing; MASK_MIN_VISIBLE 0 (the default) keeps every box for the masks
    whole = BoxOnlyDatasetMapper(_cfg("INPUT.BOX_CROP.ENABLED", "False", "INPUT.BOX_CROP.MASK_MIN_VISIBLE", "0.9"),
                                 is_train=True)(d)
    assert bool(whole["instances"].gt_box_tight.all())
    keep_all = BoxOnlyDatasetMapper(_cfg("INPUT.BOX_CROP.ENABLED", "True"), is_train=True)
    assert all(bool(keep_all(d)["instances"].gt_box_tight.all()) for _ in range(6))


@pytest.mark.parametrize("box_crop", [0.0, 1.0])
def test_mask_targets_sit_on_their_boxes_on_the_logits_grid(tmp_path, box_crop):
    """The mask-supervision target of every object the view leaves whole, on the grid of the mask logits
    (``_masks_on_grid``), has the tight box of that object's BoxInst box target on the same grid
    (``box_masks``): per side, the median offset is 0 cells and 95 % are within one (thin objects lose a
    few pixels to the resize). A target shifted by a cell, shrunk, or cropped differently from the box
    that the same logits are trained on fails."""
    from detectron2.data import DatasetCatalog

    from sim_model.boxes import box_masks
    from sim_model.condinst import _masks_on_grid
    from training.curve import dataset_splits, subset_json

    train, _ = dataset_splits(shared_data_dir() / "coco-mini")
    data = json.loads(train.json.read_text())
    subset_json(train.json, tmp_path / "all.json",
                n_masks=sum(1 for a in data["annotations"] if a.get("segmentation") and not a.get("iscrowd", 0)))
    # MASK_MIN_VISIBLE 0.999: gt_box_tight marks the objects whose whole box is in the view (a cut object's
    # mask need not fill its clipped box)
    cfg = build_config("configs/SIM_close_EffLite0_FPN_cpu.yaml", ["INPUT.BOX_CROP.PROB", str(box_crop),
                                                                   "INPUT.BOX_CROP.MASK_MIN_VISIBLE", "0.999"],
                       train_json=str(tmp_path / "all.json"), train_images=str(train.images))
    mapper = BoxOnlyDatasetMapper(cfg, is_train=True)
    stride = cfg.MODEL.CONDINST.MASK_OUT_STRIDE
    np.random.seed(0)
    offsets = []
    for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:30]:
        inst = mapper(d)["instances"]
        h, w = inst.image_size
        hm, wm = -(-h // stride), -(-w // stride)
        targets = _masks_on_grid([inst.gt_masks.tensor], [len(inst)], (hm, wm), stride).numpy() > 0
        boxes = box_masks(inst.gt_boxes.tensor.float(), hm * stride, wm * stride, stride).numpy()
        whole = inst.gt_box_tight.numpy()
        for k in np.nonzero(whole & targets.reshape(len(inst), -1).any(1))[0]:
            ys, xs = np.nonzero(targets[k])
            bys, bxs = np.nonzero(boxes[k])
            offsets.append([xs.min() - bxs.min(), ys.min() - bys.min(), xs.max() - bxs.max(), ys.max() - bys.max()])
    offsets = np.array(offsets)
    assert len(offsets) > 30
    assert np.median(offsets, axis=0).tolist() == [0, 0, 0, 0], np.median(offsets, axis=0)
    assert (np.percentile(np.abs(offsets), 95, axis=0) <= 1).all(), np.percentile(np.abs(offsets), 95, axis=0)

