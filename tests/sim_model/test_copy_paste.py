"""SIM §3.3 / Eq. 9: memory bank, importance sampling by S_k, paste geometry (occlusion updates)."""
import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sim_model.boxes import box_masks, mask_boxes
from sim_model.datasets import coco_mini_dir
from sim_model.sim.copy_paste import MemoryBank, copy_paste, num_to_paste, paste_instances, sample_instances

COCO = coco_mini_dir() / "val2017"


def _crop(h, w, value, mask=None):
    m = torch.ones(h, w, dtype=torch.bool) if mask is None else mask
    return torch.full((3, h, w), value, dtype=torch.uint8), m


def test_paste_covers_removes_pixels_shrinks_boxes_and_drops_hidden_objects():
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0],   # A: fully covered by paste 0
                          [5.0, 5.0, 9.0, 9.0],   # B: left half covered by paste 1 -> (7, 5, 9, 9)
                          [5.0, 0.0, 9.0, 3.0]])  # C: untouched
    tmasks = box_masks(boxes, 10, 10)
    c0, m0 = _crop(4, 4, 100)
    c1, m1 = _crop(4, 2, 200)
    r = paste_instances(image, tmasks, boxes, [c0, c1], [m0, m1], torch.tensor([[0, 0], [5, 5]]),
                        torch.tensor([3, 4]), torch.tensor([0.9, 0.8]))
    assert r.target_keep.tolist() == [False, True, True]
    torch.testing.assert_close(r.target_boxes, torch.tensor([[7.0, 5.0, 9.0, 9.0], [5.0, 0.0, 9.0, 3.0]]))
    assert r.target_masks.shape == (2, 10, 10)
    assert r.target_masks[0].sum() == 8 and not r.target_masks[0, :, :7].any()
    torch.testing.assert_close(r.target_masks[1], tmasks[2])
    # the pasted pixels, and nothing else, changed
    assert (r.image[:, 0:4, 0:4] == 100).all() and (r.image[:, 5:9, 5:7] == 200).all()
    changed = (r.image != image).any(0)
    assert int(changed.sum()) == 16 + 8
    assert r.paste_keep.tolist() == [True, True]
    torch.testing.assert_close(r.pasted_boxes, torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 7.0, 9.0]]))
    assert r.pasted_classes.tolist() == [3, 4]
    torch.testing.assert_close(r.pasted_scores, torch.tensor([0.9, 0.8]))
    assert not (r.pasted_masks[0] & r.target_masks.any(0)).any()  # no pixel belongs to two objects


def test_paste_only_mask_pixels_and_clipping():
    image = torch.full((3, 6, 6), 7, dtype=torch.uint8)
    ring = torch.ones(3, 3, dtype=torch.bool)
    ring[1, 1] = False  # a hole: the image shows through
    c, m = _crop(3, 3, 50, ring)
    r = paste_instances(image, torch.zeros(0, 6, 6, dtype=torch.bool), torch.zeros(0, 4), [c], [m],
                        torch.tensor([[4, -1]]), torch.tensor([1]), torch.tensor([1.0]))
    # columns 4..5, rows 0..1 inside the image; crop pixel (row 1, col 1) is the hole -> image (0, 5)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:2, 4:6] = True
    expected[0, 5] = False
    assert torch.equal(r.pasted_masks[0], expected)
    assert (r.image[:, expected] == 50).all() and (r.image[:, ~expected] == 7).all()
    torch.testing.assert_close(r.pasted_boxes, torch.tensor([[4.0, 0.0, 6.0, 2.0]]))
    # entirely outside: nothing pasted, instance dropped
    r2 = paste_instances(image, torch.zeros(0, 6, 6, dtype=torch.bool), torch.zeros(0, 4), [c], [m],
                         torch.tensor([[6, 0]]), torch.tensor([1]), torch.tensor([1.0]))
    assert torch.equal(r2.image, image) and r2.paste_keep.tolist() == [False] and r2.pasted_masks.shape[0] == 0


def test_later_paste_occludes_earlier_paste():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    crops = [_crop(2, 2, 10), _crop(3, 3, 20), _crop(2, 4, 30)]
    r = paste_instances(image, torch.zeros(0, 8, 8, dtype=torch.bool), torch.zeros(0, 4),
                        [c for c, _ in crops], [m for _, m in crops],
                        torch.tensor([[0, 0], [0, 0], [2, 2]]), torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.2, 0.3]))
    # paste 0 hidden by paste 1; paste 1 loses its corner pixel (2, 2) to paste 2
    assert r.paste_keep.tolist() == [False, True, True]
    assert r.pasted_classes.tolist() == [2, 3]
    assert int(r.pasted_masks[0].sum()) == 8 and not r.pasted_masks[0, 2, 2]
    torch.testing.assert_close(r.pasted_boxes, torch.tensor([[0.0, 0.0, 3.0, 3.0], [2.0, 2.0, 6.0, 4.0]]))


def test_min_visible_pixels_drops_nearly_hidden_objects():
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    c, m = _crop(5, 4, 1)  # leaves a 5x1 column = 5 pixels
    args = ([c], [m], torch.tensor([[0, 0]]), torch.tensor([0]), torch.tensor([1.0]))
    assert paste_instances(image, box_masks(boxes, 10, 10), boxes, *args, min_visible_pixels=5).target_keep.tolist() == [True]
    assert paste_instances(image, box_masks(boxes, 10, 10), boxes, *args, min_visible_pixels=6).target_keep.tolist() == [False]


def test_paste_bad_shapes():
    image = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError):
        paste_instances(image, torch.zeros(1, 5, 4, dtype=torch.bool), torch.zeros(1, 4), [], [],
                        torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), torch.zeros(0))
    c, m = _crop(2, 2, 1)
    with pytest.raises(ValueError):
        paste_instances(image, torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0, 4), [c], [m],
                        torch.zeros(2, 2, dtype=torch.long), torch.zeros(1), torch.zeros(1))


def test_num_to_paste():
    assert [num_to_paste(n, 0.25, 1, 3) for n in (0, 1, 3, 4, 7, 8, 12, 40)] == [0, 1, 1, 1, 1, 2, 3, 3]


def test_sample_instances_importance_and_determinism():
    scores = torch.tensor([0.9, 0.1, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_instances(scores, 1, g) for _ in range(3000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 3000
    assert abs(float(freq[0]) - 0.9) < 0.03 and abs(float(freq[1]) - 0.1) < 0.03 and float(freq[2]) < 0.005
    two = sample_instances(scores, 5, torch.Generator().manual_seed(1))
    assert sorted(two.tolist()) == [0, 1, 2]  # k clamped to N, no repetition
    a = sample_instances(torch.rand(20, generator=torch.Generator().manual_seed(2)), 3, torch.Generator().manual_seed(5))
    b = sample_instances(torch.rand(20, generator=torch.Generator().manual_seed(2)), 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(set(a.tolist())) == 3
    assert sample_instances(torch.zeros(4), 2, g).numel() == 2  # all zero: uniform
    assert sample_instances(torch.zeros(0), 2, g).numel() == 0


def test_memory_bank_fifo_capacity_and_state():
    bank = MemoryBank(capacity=3)
    for i in range(5):
        img = torch.full((3, 8, 8), i, dtype=torch.uint8)
        masks = torch.zeros(2, 8, 8, dtype=torch.bool)
        masks[0, 1:3, 2:6] = True
        masks[1, 5:8, 0:1] = True
        assert bank.push(img, masks, torch.tensor([i, 10 + i]), torch.tensor([0.5, 0.6]))
    assert len(bank) == 3
    assert [int(bank[j].classes[0]) for j in range(3)] == [2, 3, 4]  # the two oldest were dropped
    e = bank[0]
    assert e.image_crops[0].shape == (3, 2, 4) and e.mask_crops[1].shape == (3, 1)
    assert e.image_crops[0].device.type == "cpu" and (e.image_crops[0] == 2).all()
    # an image without any non-empty mask is not stored
    assert not bank.push(torch.zeros(3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), torch.tensor([1]), torch.tensor([1.0]))
    assert len(bank) == 3
    restored = MemoryBank(capacity=3)
    restored.load_state_dict(bank.state_dict())
    assert len(restored) == 3 and torch.equal(restored[2].image_crops[1], bank[2].image_crops[1])
    # max_side: a 16x8 image is stored at half scale
    small = MemoryBank(capacity=2, max_side=8)
    masks = torch.zeros(1, 16, 8, dtype=torch.bool)
    masks[0, 0:8, 0:4] = True
    small.push(torch.zeros(3, 16, 8, dtype=torch.uint8), masks, torch.tensor([0]), torch.tensor([1.0]))
    assert small[0].mask_crops[0].shape == (4, 2)
    with pytest.raises(IndexError):
        MemoryBank(2).sample()
    with pytest.raises(ValueError):
        MemoryBank(0)


def _coco_image_and_masks(ann_file, index):
    data = json.loads(ann_file.read_text())
    anns_by_img = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            anns_by_img.setdefault(a["image_id"], []).append(a)
    img_info = sorted((i for i in data["images"] if len(anns_by_img.get(i["id"], [])) >= 3),
                      key=lambda i: i["id"])[index]
    image = cv2.cvtColor(cv2.imread(str(COCO / "images" / img_info["file_name"])), cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    anns = anns_by_img[img_info["id"]]
    masks = []
    for a in anns:
        rle = mask_utils.frPyObjects(a["segmentation"], h, w)
        masks.append(mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle))
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns], dtype=np.float32)
    return (torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(np.stack(masks)).bool(),
            torch.from_numpy(boxes), torch.tensor([a["category_id"] for a in anns]))


@pytest.mark.skipif(not COCO.exists(), reason=f"coco-mini not found at {COCO}")
def test_copy_paste_on_real_coco_images():
    ann_file = COCO / "annotations" / "instances_val2017.json"
    src_img, src_masks, _, src_cls = _coco_image_and_masks(ann_file, 0)
    dst_img, _, dst_boxes, _ = _coco_image_and_masks(ann_file, 1)
    bank = MemoryBank(capacity=100, max_side=10_000)
    scores = torch.linspace(0.2, 0.9, len(src_cls))
    assert bank.push(src_img, src_masks, src_cls, scores)
    _, h, w = dst_img.shape
    tmasks = box_masks(dst_boxes, h, w)
    r1 = copy_paste(bank, dst_img, tmasks, dst_boxes, 0.25, 1, 3, generator=torch.Generator().manual_seed(0))
    r2 = copy_paste(bank, dst_img, tmasks, dst_boxes, 0.25, 1, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1.image, r2.image) and torch.equal(r1.pasted_boxes, r2.pasted_boxes)  # reproducible
    k = num_to_paste(len(src_cls), 0.25, 1, 3)
    assert len(r1.paste_keep) == k and 1 <= k <= 3
    assert r1.image.shape == dst_img.shape and r1.image.dtype == torch.uint8
    covered = r1.pasted_masks.any(0)
    assert covered.any()
    # pasted pixels changed to source pixels of the same class' mask; the rest of the image is untouched
    assert torch.equal(r1.image[:, ~covered], dst_img[:, ~covered])
    for cls, m in zip(r1.pasted_classes.tolist(), r1.pasted_masks):
        assert cls in src_cls.tolist()
    # the image's objects lost exactly the covered pixels; boxes stay inside the originals
    kept_boxes = dst_boxes[r1.target_keep]
    assert not (r1.target_masks & covered).any()
    assert (r1.target_boxes[:, :2] >= kept_boxes[:, :2] - 1e-4).all()
    assert (r1.target_boxes[:, 2:] <= kept_boxes[:, 2:] + 1e-4).all()
    for m, b in zip(r1.target_masks, r1.target_boxes):
        tight = mask_boxes(m[None])[0]
        # the box still holds its mask (to within the pixel-centre rounding of fractional boxes)
        assert (b[:2] <= tight[:2] + 1).all() and (b[2:] >= tight[2:] - 1).all()
    assert copy_paste(MemoryBank(3), dst_img, tmasks, dst_boxes, 0.25, 1, 3) is None
