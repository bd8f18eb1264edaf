"""Reading Label Studio's task, annotation and project fields: one rule for each, shared by the backend
(``/predict``, ``/webhook``) and by training's export.

- :func:`parse_project_id`: ``"12.1700000000"`` (what /setup and /predict send), ``12``, ``{"id": 12}``.
- :func:`latest_annotation`: the annotation that counts, the latest non-cancelled one.
- :func:`rectangles_of_task`: the rectangles the backend segments in batch mode.
- :func:`task_image_url`: the task's image field, also under ``$undefined$``.
- :func:`parse_regions`: an annotation's rectangles (boxes) and polygons / brush masks (masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import numpy as np
from pycocotools import mask as mask_utils

from sim_model.boxes import mask_boxes

from .regions import brush_rle_to_mask, polygons_to_mask, rectangle_to_xyxy

#: Task data key of Label Studio imports made with bare blob URLs (``settings.DATA_UNDEFINED_NAME``);
#: Label Studio usually renames it to the config's field, but not in every request.
UNDEFINED_DATA_KEY = "$undefined$"
#: A mask region counts as the object of a rectangle of its annotation when their boxes overlap this much.
MATCH_IOU = 0.5
BOX_TYPE = "rectanglelabels"
POLYGON_TYPE = "polygonlabels"
BRUSH_TYPE = "brushlabels"


def parse_project_id(value: Any) -> str | None:
    """Label Studio's project field → the project id as a string.

    Label Studio sends ``"<id>.<created_at timestamp>"`` (e.g. ``"12.1700000000"``) in /setup and
    /predict, a plain int in tasks, and the project object in webhooks; all give ``"12"``. None or ""
    gives None.

    Raises:
        ValueError: a value whose id part is not a non-negative integer.
    """
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        value = value.get("id")
        if value is None:
            return None
    if isinstance(value, bool):
        raise ValueError(f"project {value!r} is not a Label Studio project id")
    head = str(value).split(".")[0].strip()
    if not head.isdigit() or len(head) > 18:
        raise ValueError(f"project {str(value)[:40]!r} is not a Label Studio project id")
    return str(int(head))


def _timestamp(value: Any) -> datetime:
    if not value:
        return datetime.min
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min
    return dt if dt.tzinfo is None else dt.astimezone().replace(tzinfo=None)


def _recency(item: dict) -> tuple:
    """Sort key of annotations and predictions: updated_at, then created_at (parsed), then id."""
    ident = item.get("id")
    return (_timestamp(item.get("updated_at")), _timestamp(item.get("created_at")),
            ident if isinstance(ident, (int, float)) and not isinstance(ident, bool) else -1)


def latest_annotation(task: dict) -> dict | None:
    """The annotation of a task that counts: the latest one not cancelled (skipped) by its annotator.

    "Latest" is the greatest ``updated_at``, then ``created_at`` (ISO 8601 timestamps, compared as
    times), then ``id``. An annotation whose result is empty still counts: its annotator said that
    the task holds nothing to segment.

    Returns:
        the annotation dict, or None when the task has none.
    """
    anns = [a for a in (task.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(anns, key=_recency) if anns else None


def rectangles(result: Any) -> list[dict]:
    """The ``rectanglelabels`` items of a result list (anything else, or a non-list, gives [])."""
    if not isinstance(result, list):
        return []
    return [r for r in result if isinstance(r, dict) and r.get("type") == BOX_TYPE]


def rectangles_of_task(task: dict) -> tuple[list[dict], str]:
    """The rectangles to segment in batch mode ("Retrieve predictions") and where they came from.

    Returns:
        (rectanglelabels result items, source): source is ``"annotation <id>"``, ``"prediction <id>"``
        or ``"none"``. The :func:`latest_annotation` wins (even with no rectangle); without annotations,
        the latest prediction that holds rectangles (our own polygon-only predictions are passed over).
    """
    latest = latest_annotation(task)
    if latest is not None:
        return rectangles(latest.get("result")), f"annotation {latest.get('id')}"
    preds = [p for p in (task.get("predictions") or []) if isinstance(p, dict) and rectangles(p.get("result"))]
    if preds:
        latest = max(preds, key=_recency)
        return rectangles(latest.get("result")), f"prediction {latest.get('id')}"
    return [], "none"


def task_image_url(data: Any, value_key: str) -> Any:
    """The task's image field: ``data[value_key]``, else ``data["$undefined$"]`` (blob imports); None if neither."""
    if not isinstance(data, dict):
        return None
    url = data.get(value_key)
    return url if url is not None else data.get(UNDEFINED_DATA_KEY)


@dataclass
class Region:
    """One object of an annotation.

    Attributes:
        region_id: Label Studio's result ``id`` (stable across exports of the same annotation).
        label: the region's label.
        box: (4,) float64 XYXY in pixels (a rectangle clipped to the image, or the tight box of a mask).
        kind: ``"rectangle"``, ``"polygon"`` or ``"brush"``.
        mask: (H, W) bool mask of a polygon/brush region, None for rectangles.
        train: whether the region gives a training box (every rectangle; a mask that matches no rectangle).
        outlines: for a mask that matches a rectangle, that rectangle's ``region_id`` (the mask outlines
            the object the rectangle boxes); None otherwise.
    """

    region_id: str
    label: str
    box: np.ndarray
    kind: str
    mask: np.ndarray | None = None
    train: bool = True
    outlines: str | None = None


def _xywh(box: np.ndarray) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def parse_regions(result: list, width: int, height: int, to_name: str | None = None,
                  warn: Callable[[str], None] = lambda m: None) -> list[Region]:
    """An annotation's ``result`` as regions: rectangles are boxes, polygons and brush strokes are masks.

    A mask whose tight box overlaps no rectangle of the annotation (box IoU < :data:`MATCH_IOU`) is an
    object without a drawn box: it gives a training box too. Otherwise it outlines the rectangle it
    overlaps most (``Region.outlines``).

    Args:
        result: Label Studio result items.
        width, height: the image size in pixels (coordinates are in percent of it).
        to_name: keep only regions on this Image tag (None: all).
        warn: called with a message for each malformed region (which is skipped).

    Returns:
        Rectangles, then masks, each in result order.
    """
    rects, masks = [], []
    for item in result if isinstance(result, list) else []:
        if not isinstance(item, dict):
            warn(f"result item is not an object: {item!r:.80}")
            continue
        typ = item.get("type")
        if typ not in (BOX_TYPE, POLYGON_TYPE, BRUSH_TYPE) or (to_name and item.get("to_name") not in (None, to_name)):
            continue
        value = item.get("value") if isinstance(item.get("value"), dict) else {}
        rid = str(item.get("id") or f"r{len(rects) + len(masks)}")
        labels = value.get(typ)
        if not labels or not isinstance(labels, list):
            warn(f"region {rid} ({typ}) has no label list in value.{typ}")
            continue
        label = str(labels[0])
        try:
            if typ == BOX_TYPE:
                box = rectangle_to_xyxy(value, width, height)
                box = np.clip(box, 0, [width, height, width, height])
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    warn(f"region {rid}: box {np.round(box, 1).tolist()} has no area inside the "
                         f"{width}x{height} image")
                    continue
                rects.append(Region(rid, label, box, "rectangle"))
                continue
            if typ == POLYGON_TYPE:
                pts = value.get("points")
                if not pts or len(pts) < 3:
                    warn(f"region {rid}: polygon with fewer than 3 points")
                    continue
                mask, kind = polygons_to_mask([pts], width, height), "polygon"
            else:
                if value.get("format", "rle") != "rle" or not value.get("rle"):
                    warn(f"region {rid}: brush region without RLE")
                    continue
                mask, kind = brush_rle_to_mask(value["rle"], width, height), "brush"
            if not mask.any():
                warn(f"region {rid}: {kind} covers no pixel")
                continue
            box = mask_boxes(mask[None])[0].numpy().astype(np.float64)
            masks.append(Region(rid, label, box, kind, mask=mask, train=False))
        except (ValueError, TypeError, KeyError, IndexError) as e:
            warn(f"region {rid} ({typ}) is malformed: {e}")
    if rects and masks:
        ious = mask_utils.iou([_xywh(m.box) for m in masks], [_xywh(r.box) for r in rects], [0] * len(rects))
        for m, row in zip(masks, np.atleast_2d(ious)):
            m.train = not bool((row >= MATCH_IOU).any())
            m.outlines = None if m.train else rects[int(np.argmax(row))].region_id
    else:
        for m in masks:
            m.train = True
    return rects + masks


__all__ = ["UNDEFINED_DATA_KEY", "MATCH_IOU", "parse_project_id", "latest_annotation", "rectangles",
           "rectangles_of_task", "task_image_url", "Region", "parse_regions"]
