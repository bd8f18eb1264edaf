"""What the mask-supervision loss sees: the annotator's mask on the grid of the mask logits it is compared with.

For a few real training views (the served recipe's whole augmentation chain: box-centred crop and zoom,
flip), the training step's own ``loss_mask`` inputs are captured (``sim_model.condinst`` calls
:func:`~sim_model.sim.pseudo_masks.pseudo_mask_loss` with the supervised positives' mask logits and the
targets of :func:`~sim_model.condinst._masks_on_grid`), and each supervised object is drawn on the view
sampled at the logits' grid (pixel centres ``stride // 2 + k · stride``, AdelaiDet's sampling): the target
(green), the mask logits ≥ 0 (red) and the BoxInst box target of the same object on the same grid (blue
outline). Per object it reports the target's cells outside its box target, the cells between the target's
tight box and the box target's, and (with trained ``--weights``) the IoU of target and logits ≥ 0 at the
logits' own offset and at the best offset in ±2 cells: a target shifted, shrunk or cut differently from
its logits shows as a best offset other than (0, 0) or a gap of more than a cell.

    .venv/bin/python -m training.supervision_overlays --data ../shared/data/coco-mini \\
        [--weights <run>/model_final.pth] [--out docs/supervision-overlays.png] [--views 6]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

#: Offsets (cells) searched for the best alignment of target and logits.
MAX_SHIFT = 2


def _shifted_iou(a: np.ndarray, b: np.ndarray, dy: int, dx: int) -> float:
    """IoU of bool ``a`` and ``b`` moved by (dy, dx) cells (cells moved in from outside are empty)."""
    moved = np.zeros_like(b)
    h, w = b.shape
    moved[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = b[max(-dy, 0):h - max(dy, 0),
                                                                    max(-dx, 0):w - max(dx, 0)]
    union = (a | moved).sum()
    return float((a & moved).sum() / union) if union else 0.0


def object_report(target: np.ndarray, logits: np.ndarray, box_target: np.ndarray) -> dict:
    """Alignment figures of one supervised object on the mask grid.

    Args:
        target: (Hm, Wm) bool, the annotator's mask as the loss sees it.
        logits: (Hm, Wm) float mask logits of the positive compared with it.
        box_target: (Hm, Wm) bool, BoxInst's box mask of the same object on the same grid.

    Returns:
        ``{"target_cells", "outside_box_cells", "box_gap_cells", "iou_at_0", "best_shift", "iou_at_best"}``:
        ``box_gap_cells`` the largest distance (cells) between a side of the target's tight box and the
        same side of the box target's (0-1 for an aligned, whole target).
    """
    fg = logits >= 0
    ys, xs = np.nonzero(target)
    bys, bxs = np.nonzero(box_target)
    gap = -1
    if len(ys) and len(bys):
        gap = int(max(abs(ys.min() - bys.min()), abs(ys.max() - bys.max()),
                      abs(xs.min() - bxs.min()), abs(xs.max() - bxs.max())))
    shifts = {(dy, dx): _shifted_iou(target, fg, dy, dx)
              for dy in range(-MAX_SHIFT, MAX_SHIFT + 1) for dx in range(-MAX_SHIFT, MAX_SHIFT + 1)}
    best = max(shifts, key=shifts.get)
    return {"target_cells": int(target.sum()), "outside_box_cells": int((target & ~box_target).sum()),
            "box_gap_cells": gap, "iou_at_0": shifts[(0, 0)], "best_shift": list(best), "iou_at_best": shifts[best]}


def capture(cfg, views: int, seed: int = 0, weights: str | None = None) -> list[dict]:
    """Run the training step's losses on ``views`` mapped training views (batch of one) and capture, per
    supervised positive: the view sampled on the grid, target, logits and box target (numpy)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog

    import sim_model.condinst as condinst
    from training.data import BoxOnlyDatasetMapper
    from training.train import Trainer

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = Trainer.build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    model.train()
    mapper = BoxOnlyDatasetMapper(cfg, is_train=True)
    dicts = [d for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
             if any(a.get("mask_supervised") for a in d.get("annotations", []))]
    stride = int(model.mask_out_stride)
    grabbed: list = []
    real_loss, real_grid = condinst.pseudo_mask_loss, condinst._masks_on_grid
    seen: dict = {}

    def grid_spy(*a, **k):
        out = real_grid(*a, **k)
        seen["grid"] = out
        return out

    def loss_spy(logits, target, weight, *a, **k):
        grabbed.append((logits.detach().cpu().numpy(), target.detach().cpu().numpy()))
        return real_loss(logits, target, weight, *a, **k)

    out = []
    condinst.pseudo_mask_loss, condinst._masks_on_grid = loss_spy, grid_spy
    try:
        rng = np.random.default_rng(seed)
        for idx in rng.choice(len(dicts), size=min(views, len(dicts)), replace=False):
            batch = [mapper(dicts[int(idx)])]
            inst = batch[0]["instances"]
            if not (inst.has("gt_mask_supervised") and bool(inst.gt_mask_supervised.any())):
                continue
            grabbed.clear()
            with torch.no_grad():
                model.losses(batch)
            if not grabbed:
                continue
            logits, target = grabbed[-1]
            image = batch[0]["image"].numpy().transpose(1, 2, 0)
            if cfg.INPUT.FORMAT == "BGR":
                image = image[:, :, ::-1]
            start = stride // 2
            hm, wm = target.shape[-2:]
            view = np.zeros((hm, wm, 3), np.uint8)
            sampled = image[start::stride, start::stride][:hm, :wm]
            view[:sampled.shape[0], :sampled.shape[1]] = sampled
            # the box target of each supervised positive: the object whose grid target matches
            from sim_model.boxes import box_masks
            boxes = inst.gt_boxes.tensor.float()
            box_grid = box_masks(boxes, hm * stride, wm * stride, stride).numpy().astype(bool) \
                if len(boxes) else np.zeros((0, hm, wm), bool)
            full_targets = seen["grid"].cpu().numpy().astype(bool)
            for k in range(target.shape[0]):
                t = target[k].astype(bool)
                obj = next((j for j in range(len(full_targets)) if np.array_equal(full_targets[j], t)), None)
                if obj is None:
                    continue
                out.append({"view": view, "target": t, "logits": logits[k], "box_target": box_grid[obj],
                            "label": int(inst.gt_classes[obj]), "image": dicts[int(idx)]["file_name"]})
    finally:
        condinst.pseudo_mask_loss, condinst._masks_on_grid = real_loss, real_grid
    return out


def draw(objects: list[dict], path: Path, per_row: int = 4, cell: int = 3) -> None:
    """A PNG of the objects: each the view on the grid (cells ``cell`` px), target green, logits ≥ 0 red
    (yellow where both), box target's outline blue."""
    import cv2

    tiles = []
    for o in objects:
        img = o["view"].astype(np.float32) * 0.6
        t, f = o["target"], o["logits"] >= 0
        img[t & ~f] = img[t & ~f] * 0.3 + np.array([0, 255, 0]) * 0.7
        img[f & ~t] = img[f & ~t] * 0.3 + np.array([255, 0, 0]) * 0.7
        img[t & f] = img[t & f] * 0.3 + np.array([255, 255, 0]) * 0.7
        img = cv2.resize(img.astype(np.uint8), None, fx=cell, fy=cell, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(cv2.resize(o["box_target"].astype(np.uint8), None, fx=cell, fy=cell,
                                                  interpolation=cv2.INTER_NEAREST), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, (0, 128, 255), 1)
        tiles.append(img)
    if not tiles:
        raise ValueError("no supervised object was captured")
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0] + 4), (0, w - t.shape[1] + 4), (0, 0)), constant_values=255) for t in tiles]
    while len(tiles) % per_row:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[i:i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    cv2.imwrite(str(path), np.concatenate(rows, axis=0)[:, :, ::-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/coco-mini")
    ap.add_argument("--config", default="configs/SIM_close_EffLite0_FPN_cpu.yaml")
    ap.add_argument("--weights", default=None, help="a trained checkpoint (else the untrained network)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--objects", type=int, default=12, help="objects drawn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/supervision-overlays.png")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = ap.parse_args(argv)
    from training.curve import dataset_splits, subset_json
    from training.train import build_config

    train, _ = dataset_splits(Path(args.data))
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "all_masks.json"
        n = len([a for a in json.loads(train.json.read_text())["annotations"]
                 if a.get("segmentation") and not a.get("iscrowd", 0)])
        subset_json(train.json, js, n_masks=n)
        cfg = build_config(args.config, ["SOLVER.IMS_PER_BATCH", "1", "MODEL.MASK_SUPERVISION.WEIGHT", "1.0",
                                         *args.opts], train_json=str(js), train_images=str(train.images))
        objects = capture(cfg, args.views, args.seed, args.weights)
    distinct, seen = [], set()
    for o in objects:  # one positive per object (an object has several positives with one target)
        key = (o["image"], o["target"].tobytes())
        if key not in seen:
            seen.add(key)
            distinct.append(o)
    objects = distinct
    reports = [object_report(o["target"], o["logits"], o["box_target"]) for o in objects]
    for o, r in zip(objects, reports):
        print(f"{Path(o['image']).name:24s} class {o['label']:3d} {json.dumps(r)}")
    if reports:
        shifts = np.array([r["best_shift"] for r in reports])
        print(f"{len(reports)} objects | median IoU at the logits' offset {np.median([r['iou_at_0'] for r in reports]):.3f}"
              f" | median best shift (dy, dx) {np.median(shifts, axis=0).tolist()}"
              f" | median gain of the best shift {np.median([r['iou_at_best'] - r['iou_at_0'] for r in reports]):.3f}"
              f" | target cells outside the box target {sum(r['outside_box_cells'] for r in reports)} of "
              f"{sum(r['target_cells'] for r in reports)}")
    draw(objects[: args.objects], Path(args.out))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
