"""COCO instances files of an exported project: training boxes and validation masks.

Class ids come from the registry's persistent class map: in the COCO files the category id is
``class id + 1`` and every known label is listed, so detectron2's contiguous ids equal class ids.
Images keep their Label Studio task id as COCO image id; annotations carry ``ls_region_id``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from sim_backend.tasks import Region
from sim_model.evaluation import encode_mask


def coco_dict(project: int | str, labels: Sequence[str], tasks: Sequence, keep: Callable[[Region], bool],
              with_masks: bool) -> dict:
    """A COCO instances dict of the regions ``keep`` selects.

    Args:
        project: project id (description only).
        labels: the class map (index = class id).
        tasks: :class:`training.ls_export.ExportedTask` items; a task without a kept region is left out.
        keep: which regions become annotations.
        with_masks: also write ``segmentation`` (RLE) and the mask's ``area``; else ``area`` is the box's.

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


__all__ = ["coco_dict", "write_coco"]
