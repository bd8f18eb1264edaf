"""An engine's masks for the tasks of an exported project, and pushing them to Label Studio as predictions.

:func:`predict_task` runs a box→mask engine on one task's training boxes; :func:`push_predictions`
stores every task's masks in Label Studio as a **prediction** (never an annotation): polygonlabels
regions (:func:`sim_backend.regions.mask_regions`), each region's ``score`` = its box's S_k, the task's
``score`` = the lowest S_k of the task (the worst mask decides where a task sorts), ``model_version`` as
given. A task whose masks are all empty gets a prediction without regions, still scored, so it sorts
among the worst. Older predictions of the same model_version on the task are deleted first, so pushing
twice does not duplicate. Sorting the Data Manager's "Prediction score" column ascending then lists the
tasks with the worst masks first.
"""
from __future__ import annotations

import sys
from typing import Callable

import httpx
import numpy as np
from label_studio_sdk.client import LabelStudio

from sim_backend.label_config import parse_label_config
from sim_backend.regions import mask_regions
from sim_backend.settings import Settings
from sim_model.box_to_mask import BoxToMask, ValidBoxPrediction, predict_valid_boxes
from training.image_cache import read_rgb
from training.ls_export import ExportedTask, ProjectExport
from training.score_store import ScoreDB, score_row


def predict_task(engine: BoxToMask, task: ExportedTask, image: np.ndarray | None = None) -> ValidBoxPrediction:
    """Run a box→mask engine on the training boxes of one exported task.

    Args:
        engine: any :class:`sim_model.box_to_mask.BoxToMask`.
        task: the task; ``task.boxes[i]`` is box i of the result.
        image: its (H, W, 3) uint8 RGB image (read from the cache when None).

    Returns:
        :class:`sim_model.box_to_mask.ValidBoxPrediction` over ``task.boxes``.

    Raises:
        FileNotFoundError: the cached image cannot be read.
    """
    image = read_rgb(task.file) if image is None else image
    regions = task.boxes
    boxes = np.stack([r.box for r in regions]) if regions else np.zeros((0, 4))
    return predict_valid_boxes(engine, image, boxes, [r.label for r in regions])


def push_predictions(engine: BoxToMask, export: ProjectExport, model_version: str, client: LabelStudio,
                     db: ScoreDB | None = None, version: str | None = None, settings: Settings | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Store each task's masks in Label Studio as a prediction scored by S_k (module docstring).

    Args:
        engine: the box→mask engine.
        export: the project's tasks, boxes, cached images and label config.
        model_version: the predictions' ``model_version`` (e.g. ``sim-v0003``).
        client: ``label_studio_sdk.LabelStudio``.
        db, version: when given, the recomputed S_k are stored in ``db`` under ``version`` too.
        settings: mask threshold, polygon tolerance, min region (default: the environment).
        progress: called with progress lines (default: print to stderr).

    Returns:
        {"tasks": n pushed, "regions": n regions, "skipped": [str]}.

    Raises:
        ValueError: the labeling config has no PolygonLabels control.
        httpx.TransportError: Label Studio stopped answering.
    """
    s = settings or Settings.from_env()
    say = progress or (lambda m: print(f"[scores] {m}", file=sys.stderr, flush=True))
    target = parse_label_config(export.label_config).bindings[0].polygon
    if target is None:
        raise ValueError("the labeling config has no PolygonLabels control to hold the masks")
    pushed, n_regions, skipped, rows = 0, 0, [], []
    for task in export.tasks:
        try:
            pred = predict_task(engine, task)
            skipped += [f"task {task.task_id} region {task.boxes[i].region_id}: {why}" for i, why in pred.skipped]
            result = []
            for k, i in enumerate(pred.kept):
                region = task.boxes[i]
                made = mask_regions(pred.masks, k, region.label, [target], threshold=s.mask_threshold,
                                    tolerance_px=s.polygon_tolerance_px, min_region_px=s.min_region_px)
                if not made and region.label not in target.labels:
                    skipped.append(f"task {task.task_id} region {region.region_id}: label {region.label!r} "
                                   f"not in {target.name}")
                    continue
                result += made
                if version is not None:
                    rows.append(score_row(task, region, version, pred.masks.scores[k]))
            if not len(pred.masks):
                continue
            for p in client.predictions.list(task=task.task_id):
                if getattr(p, "model_version", None) == model_version:
                    client.predictions.delete(id=p.id)
            client.predictions.create(task=task.task_id, result=result, score=float(pred.masks.scores.min()),
                                      model_version=model_version)
            pushed += 1
            n_regions += len(result)
        except httpx.TransportError:
            raise
        except Exception as e:  # one bad task never sinks the batch
            skipped.append(f"task {task.task_id}: {e.__class__.__name__}: {e}")
            say(skipped[-1] + " (skipped)")
    if db is not None and rows:
        db.put(rows)
    say(f"pushed {pushed} predictions ({n_regions} polygon regions) as model_version {model_version}")
    return {"tasks": pushed, "regions": n_regions, "skipped": skipped}


__all__ = ["predict_task", "push_predictions"]
