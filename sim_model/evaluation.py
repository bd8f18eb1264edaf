"""Box→mask evaluation on a COCO-format dataset: the one implementation that the benchmark, the SIM
evaluation and the retrain evaluation all call.

For every non-crowd ground-truth box, the engine predicts a mask (all boxes of an image in one
:meth:`BoxToMask.predict` call, labels = the COCO category names). Figures:

- ``mIoU``: mean over boxes of IoU(predicted mask >= ``mask_threshold``, ground-truth mask), in [0, 1];
  ``mIoU_small`` / ``mIoU_medium`` / ``mIoU_large`` split by the COCO size of the ground truth
  (annotation ``area`` < 32², < 96², >= 96² pixels, as COCOeval does).
- ``AP`` / ``AP50`` / ``AP75`` (and ``AP_small`` / ``AP_medium`` / ``AP_large``): COCO segm AP from
  pycocotools' COCOeval, every predicted mask submitted as a detection of its box's category with the
  engine's score, RLE-encoded with ``pycocotools.mask``. **Percent, 0–100**, the convention of the COCO
  leaderboard and of the SIM paper (32.2 AP); a perfect engine gives 100.
- ``mask_precision`` / ``mask_recall``: mean over boxes of |pred ∧ gt| / |pred| (boxes with a non-empty
  prediction) and |pred ∧ gt| / |gt| (boxes with a non-empty ground truth), in [0, 1]; ``area_ratio``: median over
  boxes of |pred| / |gt|. They tell a mask that shrinks (ratio < 1, recall falls) from one that bleeds.
- ``ms_per_box``: median over boxes of (its image's predict time / that image's box count), milliseconds;
  ``ms_per_image``: median over images of the predict time, milliseconds. Wall clock, one process.

A box that :func:`sim_model.box_to_mask.check_boxes` rejects (none in coco-mini) is not sent to the
engine (:func:`sim_model.box_to_mask.predict_valid_boxes`); it counts as IoU 0 with no detection and is
listed in ``skipped``. Predicted masks stay box-local (:class:`~sim_model.box_to_mask.BoxMasks`): IoU is
computed on the box's pixels, and each mask is pasted into an image-sized array only for its COCO RLE.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sim_model.box_to_mask import BoxMasks, BoxToMask, predict_valid_boxes
from sim_model.boxes import xywh_to_xyxy

#: COCO size ranges by ground-truth area in pixels (COCOeval's areaRng): small < 32², medium < 96².
SMALL_AREA = 32 ** 2
MEDIUM_AREA = 96 ** 2


def coco_size(area: float) -> str:
    """COCO size class of an object of ``area`` pixels: "small", "medium" or "large"."""
    return "small" if area < SMALL_AREA else ("medium" if area < MEDIUM_AREA else "large")


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two binary masks.

    Args:
        pred, gt: (H, W) bool (or 0/1) arrays of the same shape.

    Returns:
        |pred ∧ gt| / |pred ∨ gt| in [0, 1]; 1.0 when both are empty.
    """
    pred = pred.astype(bool)
    gt = gt.astype(bool)
    return iou_of_counts(int(np.logical_and(pred, gt).sum()), int(pred.sum()), int(gt.sum()))


def box_mask_overlap(masks: BoxMasks, k: int, gt: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """Pixel counts (|pred ∧ gt|, |pred|, |gt|) of box-local mask ``k`` (probability >= ``threshold``) and a
    full-image ground-truth mask.

    The prediction is zero outside its box, so only the box's pixels of ``gt`` need comparing; the
    counts equal those of the pasted mask and ``gt``.

    Args:
        masks: the engine's :class:`~sim_model.box_to_mask.BoxMasks`.
        k: the mask.
        gt: (H, W) bool ground truth.
        threshold: foreground threshold of the prediction.
    """
    c0, r0, c1, r1 = (int(v) for v in masks.bounds[k])
    pred = masks.foreground(k, threshold)
    gt = gt.astype(bool)
    return int(np.logical_and(pred, gt[r0:r1, c0:c1]).sum()), int(pred.sum()), int(gt.sum())


def box_mask_iou(masks: BoxMasks, k: int, gt: np.ndarray, threshold: float) -> float:
    """IoU of box-local mask ``k`` (probability >= ``threshold``) with a full-image ground-truth mask; equals
    :func:`mask_iou` of the pasted mask and ``gt`` (counts from :func:`box_mask_overlap`)."""
    return iou_of_counts(*box_mask_overlap(masks, k, gt, threshold))


def iou_of_counts(inter: int, n_pred: int, n_gt: int) -> float:
    """IoU from pixel counts |pred ∧ gt|, |pred|, |gt|; 1.0 when both masks are empty."""
    union = n_pred + n_gt - inter
    return float(inter / union) if union else 1.0


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool mask → COCO compressed RLE (``counts`` as str, JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def most_per_image(items: list[dict]) -> int:
    """The largest number of COCO items (annotations or detections, each with an ``image_id``) on one image;
    0 for none. COCOeval's ``maxDets`` must reach it for crowded images (375 nuclei in dsb2018) to count."""
    if not items:
        return 0
    return int(np.unique([d["image_id"] for d in items], return_counts=True)[1].max())


def coco_segm_ap(coco_gt: COCO, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCO segm AP of mask detections with pycocotools' COCOeval.

    Args:
        coco_gt: the ground truth.
        detections: COCO result dicts {image_id, category_id, segmentation (RLE), score}.
        image_ids: the images evaluated (others are ignored).

    Returns:
        {"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"} in percent (0–100); -1 where COCOeval
        has no ground truth for a size range; all 0.0 when there are no detections. COCOeval's
        detection cap per image (``maxDets``, 100 by default) is raised to the largest number of
        detections of one image, so that crowded images (375 nuclei) count every mask.
    """
    keys = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]
    if not detections:
        return {k: 0.0 for k in keys}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.imgIds = list(image_ids)
        ev.params.maxDets = [1, 10, max(100, most_per_image(detections))]
        ev.evaluate()
        ev.accumulate()
    # COCOeval.summarize's "AP" row is hard-wired to maxDets=100; read the precision table at the last cap
    p, precision = ev.params, ev.eval["precision"]  # (T iou thresholds, R recalls, K classes, A areas, M caps)

    def mean_precision(iou: float | None = None, area: str = "all") -> float:
        s = precision[..., p.areaRngLbl.index(area), -1]
        if iou is not None:
            s = s[np.isclose(p.iouThrs, iou)]
        s = s[s > -1]
        return float(s.mean()) * 100.0 if s.size else -1.0

    return {"AP": mean_precision(), "AP50": mean_precision(0.5), "AP75": mean_precision(0.75),
            "AP_small": mean_precision(area="small"), "AP_medium": mean_precision(area="medium"),
            "AP_large": mean_precision(area="large")}


def evaluate_box_to_mask(engine: BoxToMask, coco_json: str | os.PathLike, image_dir: str | os.PathLike, *,
                         max_images: int | None = None, progress: bool = True,
                         mask_threshold: float = 0.5, missing_images: str = "raise") -> dict[str, Any]:
    """Evaluate a box→mask engine on the ground-truth boxes of a COCO instances dataset.

    Args:
        engine: any :class:`BoxToMask`.
        coco_json: COCO instances JSON (boxes [x, y, w, h] pixels; polygon or RLE masks).
        image_dir: folder holding the images named by ``images[].file_name``.
        max_images: evaluate only the first N images (sorted by image id); None = all.
        progress: print one line per image to stderr.
        mask_threshold: a predicted mask probability >= this is foreground (mIoU and AP).
        missing_images: "raise" (default) or "skip": a missing or unreadable image is then left out of
            every figure (its boxes are not counted, COCOeval ignores it) and listed in ``skipped_images``.

    Returns:
        dict with the figures described in the module docstring (``mIoU``, ``mIoU_small``,
        ``mIoU_medium``, ``mIoU_large``, ``AP``, ``AP50``, ``AP75``, ``AP_small``, ``AP_medium``,
        ``AP_large``, ``mask_precision``, ``mask_recall``, ``area_ratio``, ``ms_per_box``, ``ms_per_image``), plus
        ``n_images``, ``n_boxes``, ``n_small`` / ``n_medium`` / ``n_large``, ``model_version``, ``skipped`` (list
        of {ann_id, reason}), ``skipped_images`` (list of {image_id, reason}) and ``per_box`` (list of
        {ann_id, image_id, category, size, iou, score, pred_pixels, gt_pixels, inter_pixels}).

    Raises:
        FileNotFoundError: the JSON is missing, or an image is and ``missing_images="raise"``.
        ValueError: an unknown ``missing_images``.
        BoxToMaskError: the engine returned masks or scores that break the BoxMasks contract.
    """
    if missing_images not in ("raise", "skip"):
        raise ValueError(f"missing_images must be 'raise' or 'skip', got {missing_images!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco_json))
    cat_names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    image_ids = sorted(coco.getImgIds())
    if max_images is not None:
        image_ids = image_ids[:max_images]

    per_box, detections, skipped, skipped_images, evaluated = [], [], [], [], []
    image_ms, box_ms = [], []
    for n, img_id in enumerate(image_ids):
        info = coco.loadImgs(img_id)[0]
        path = os.path.join(str(image_dir), info["file_name"])
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            if missing_images == "raise":
                raise FileNotFoundError(f"cannot read image {path}")
            skipped_images.append({"image_id": img_id, "reason": f"cannot read image {path}"})
            continue
        evaluated.append(img_id)
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        boxes = np.stack([xywh_to_xyxy(a["bbox"]) for a in anns])
        labels = [cat_names[a["category_id"]] for a in anns]
        t0 = time.perf_counter()
        pred = predict_valid_boxes(engine, image, boxes, labels)
        dt = (time.perf_counter() - t0) * 1000.0
        for i, reason in pred.skipped:
            skipped.append({"ann_id": anns[i]["id"], "reason": reason})
            per_box.append({"ann_id": anns[i]["id"], "image_id": img_id, "category": labels[i],
                            "size": coco_size(anns[i]["area"]), "iou": 0.0, "score": 0.0,
                            "pred_pixels": 0, "gt_pixels": int(coco.annToMask(anns[i]).sum()), "inter_pixels": 0})
        if not pred.kept:
            continue
        image_ms.append(dt)
        box_ms.extend([dt / len(pred.kept)] * len(pred.kept))
        masks = pred.masks
        for k, i in enumerate(pred.kept):
            a = anns[i]
            score = float(masks.scores[k])
            inter, n_pred, n_gt = box_mask_overlap(masks, k, coco.annToMask(a), mask_threshold)
            per_box.append({"ann_id": a["id"], "image_id": img_id, "category": labels[i],
                            "size": coco_size(a["area"]), "score": score, "iou": iou_of_counts(inter, n_pred, n_gt),
                            "pred_pixels": n_pred, "gt_pixels": n_gt, "inter_pixels": inter})
            detections.append({"image_id": img_id, "category_id": a["category_id"], "score": score,
                               "segmentation": encode_mask(masks.full(k) >= mask_threshold)})
        if progress:
            print(f"[{n + 1}/{len(image_ids)}] image {img_id}: {len(pred.kept)} boxes, {dt:.0f} ms, "
                  f"mean IoU {np.mean([p['iou'] for p in per_box[-len(pred.kept):]]):.3f}", file=sys.stderr)

    out: dict[str, Any] = {"model_version": getattr(engine, "model_version", "unknown")}
    ious = np.array([p["iou"] for p in per_box])
    out["mIoU"] = float(ious.mean()) if len(ious) else 0.0
    for size in ("small", "medium", "large"):
        sel = np.array([p["iou"] for p in per_box if p["size"] == size])
        out[f"mIoU_{size}"] = float(sel.mean()) if len(sel) else float("nan")
        out[f"n_{size}"] = int(len(sel))
    out.update(overlap_figures(per_box))
    out.update(coco_segm_ap(coco, detections, evaluated))
    out["ms_per_box"] = float(np.median(box_ms)) if box_ms else float("nan")
    out["ms_per_image"] = float(np.median(image_ms)) if image_ms else float("nan")
    out["n_images"] = len(image_ms)
    out["n_boxes"] = len(per_box)
    out["skipped"] = skipped
    out["skipped_images"] = skipped_images
    out["per_box"] = per_box
    return out


def overlap_figures(per_box: list[dict]) -> dict[str, float]:
    """``mask_precision``, ``mask_recall`` (means) and ``area_ratio`` (median) of per-box pixel counts
    (module docstring); NaN where no box qualifies.

    Args:
        per_box: dicts with int ``pred_pixels``, ``gt_pixels``, ``inter_pixels``.
    """
    pred = np.array([p["pred_pixels"] for p in per_box], float)
    gt = np.array([p["gt_pixels"] for p in per_box], float)
    inter = np.array([p["inter_pixels"] for p in per_box], float)
    has_pred, has_gt = pred > 0, gt > 0

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    return {"mask_precision": mean(inter[has_pred] / pred[has_pred]),
            "mask_recall": mean(inter[has_gt] / gt[has_gt]),
            "area_ratio": float(np.median(pred[has_gt] / gt[has_gt])) if has_gt.any() else float("nan")}


__all__ = ["evaluate_box_to_mask", "overlap_figures", "box_mask_overlap", "iou_of_counts", "coco_segm_ap",
           "most_per_image", "mask_iou", "box_mask_iou", "encode_mask",
           "coco_size", "SMALL_AREA", "MEDIUM_AREA"]
