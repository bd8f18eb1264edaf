"""COCO instances files of an exported project: training boxes (with the masks that teach) and
validation masks.

Class ids come from the registry's persistent class map: in the COCO files the category id is
``class id + 1`` and every known label is listed, so detectron2's contiguous ids equal class ids.
Images keep their Label Studio task id as COCO image id; annotations carry ``ls_region_id``.

The masks annotators drew or corrected are split once and for all by :func:`held_out`: a fixed share
validates (the retrain's gate), the others supervise their instance in training (the annotation of the
rectangle they outline, or their own box, gets ``segmentation`` and ``"mask_supervised": true``, read
by :mod:`training.data`). The split hashes the task and region ids, so a mask never changes side
between retrains and the gate never scores a mask the model was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sim_backend.tasks import Region
from sim_model.evaluation import encode_mask

#: COCO annotation key marking a mask that supervises its instance in training (read by training.data).
MASK_SUPERVISED_KEY = "mask_supervised"


def held_out(task_id: int | str, region_id: str, fraction: float) -> bool:
    """Whether an annotator's mask validates (True) or teaches (False): a hash of the task and region ids
    in [0, 1) below ``fraction`` (stable across exports and retrains).

    Args:
        task_id, region_id: Label Studio's ids of the task and of the mask's region.
        fraction: the share of masks held out for validation, in [0, 1].
    """
    h = hashlib.sha1(f"{task_id}/{region_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction


def coco_dict(project: int | str, labels: Sequence[str], tasks: Sequence, keep: Callable[[Region], bool],
              with_masks: bool, supervision: Callable[[object, Region], np.ndarray | None] | None = None) -> dict:
    """A COCO instances dict of the regions ``keep`` selects.

    Args:
        project: project id (description only).
        labels: the class map (index = class id).
        tasks: :class:`training.ls_export.ExportedTask` items; a task without a kept region is left out.
        keep: which regions become annotations.
        with_masks: also write ``segmentation`` (RLE) and the mask's ``area``; else ``area`` is the box's.
        supervision: (task, region) → the (H, W) bool mask that supervises that region's instance in
            training, or None; such an annotation gets ``segmentation`` and ``"mask_supervised": true``.

    Returns:
        ``{"info", "images", "annotations", "categories"}``; boxes as COCO ``[x, y, w, h]`` pixels.
    """
    cat_of = {label: i + 1 for i, label in enumerate(labels)}
    images, anns = [], []
    for t in tasks:
        regions = [r for r in t.regions if keep(r) and r.label in cat_of]
        if not regions:
            continue
        images.append({"id": int(t.task_id), "file_name": t.file.name, "width": t.width, "height": t.height,
                       "ls_annotation_id": t.annotation_id, "ls_image": t.image_url})
        for r in regions:
            x0, y0, x1, y1 = (float(v) for v in r.box)
            a = {"id": len(anns) + 1, "image_id": int(t.task_id), "category_id": cat_of[r.label],
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "ls_region_id": r.region_id}
            if with_masks:
                a["segmentation"] = encode_mask(r.mask)
                a["area"] = float(r.mask.sum())
            else:
                a["area"] = (x1 - x0) * (y1 - y0)
                mask = supervision(t, r) if supervision is not None else None
                if mask is not None:
                    a["segmentation"] = encode_mask(mask)
                    a[MASK_SUPERVISED_KEY] = True
            anns.append(a)
    cats = [{"id": i + 1, "name": label, "supercategory": "object"} for i, label in enumerate(labels)]
    return {"info": {"description": f"Label Studio project {project}"}, "images": images,
            "annotations": anns, "categories": cats}


def write_coco(path: str | os.PathLike, data: dict) -> Path:
    """Write a COCO dict as JSON (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


__all__ = ["MASK_SUPERVISED_KEY", "coco_dict", "held_out", "write_coco"]
