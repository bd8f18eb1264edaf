"""The /predict protocol: Label Studio tasks (+ drawn rectangles) → mask regions, one result per task.

Two modes:

* **interactive** — ``params.context.result`` holds the rectangle(s) the annotator just drew; each
  becomes a polygonlabels region per connected mask part (and a brushlabels region when the config
  has BrushLabels and ``OUTPUT_BRUSH`` is on) with the box's label;
* **batch** ("Retrieve predictions", no context) — for each task, the rectangles of its latest
  annotation or, when it has none, of its latest prediction that holds rectangles
  (:func:`sim_backend.tasks.rectangles_of_task`).

The answer always has exactly one entry per task, in order: ``{"result", "score", "model_version"}``.
Limits (:class:`~sim_backend.settings.Settings`): at most ``MAX_TASKS_PER_REQUEST`` tasks (else 400), at
most ``MAX_BOXES_PER_TASK`` rectangles per task (else that task's error), and ``REQUEST_DEADLINE_S``: the
tasks not started by then get a "deadline exceeded" error, and inside a task the boxes not segmented
by then are skipped with a "deadline exceeded" reason (the task keeps the regions of the boxes done), so
Label Studio always gets an answer in time (the deadline plus about one box).
A malformed field (``params.context`` not an object, ``data.image`` not a string, a label list that is
not a list, …) is named in the error with what was expected; values are echoed cut to a few dozen
characters.
A task that fails (no image field, an unreachable or broken image, …) gets an empty result with an
extra ``"error"`` key (Label Studio 1.23 copies only result/score/model_version from each entry) and
its error is logged; a box that cannot be segmented (zero area, outside the image, unknown label, …)
is skipped with a logged reason. Both are also listed in the response's top-level ``"errors"`` and
``"skipped"`` keys, which Label Studio ignores (it reads ``"results"`` only). All boxes of one image go
to the engine together, in chunks under the deadline (:func:`sim_model.box_to_mask.predict_valid_box_chunks`); each mask becomes
regions through :func:`sim_backend.regions.mask_regions`. Nothing here writes to Label Studio.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim_model.box_to_mask import DEADLINE_EXCEEDED, BoxToMask, predict_valid_box_chunks

from .engines import EngineProvider
from .images import ImageLoader, ImageLoadError, quoted
from .label_config import Control, ImageBinding, LabelConfig, LabelConfigError, parse_label_config, target_label
from .regions import mask_regions, rectangle_to_xyxy
from .settings import Settings
from .tasks import parse_project_id, rectangles, rectangles_of_task, task_image_url

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request as a whole is malformed (answered with HTTP 400 and this message)."""


class TaskError(RuntimeError):
    """One task cannot be predicted (it gets an empty result; the other tasks are unaffected)."""


def project_id(value: Any) -> str | None:
    """:func:`sim_backend.tasks.parse_project_id`, a malformed value answered as :class:`BadRequest`."""
    try:
        return parse_project_id(value)
    except ValueError as e:
        raise BadRequest(str(e)) from None


@dataclass
class _Box:
    index: int            # position among the task's rectangles (for messages)
    region_id: Any        # id of the source rectangle
    binding: ImageBinding
    label: str
    value: dict


class Predictor:
    """Turn /predict payloads into results with a :class:`BoxToMask` engine.

    Args:
        settings: thresholds, polygon tolerance, OUTPUT_BRUSH, the request limits.
        engines: picks the engine of the request's project.
        images: loads task images.
    """

    def __init__(self, settings: Settings, engines: EngineProvider, images: ImageLoader):
        self.settings = settings
        self.engines = engines
        self.images = images
        self._setup_configs: dict[str, str] = {}  # project -> label config seen in /setup (this process)

    def remember_config(self, project: str | None, label_config: str) -> None:
        """Keep /setup's config for /predict requests that lack ``label_config`` (same process only)."""
        if project is not None:
            self._setup_configs[project] = label_config

    # -- request -----------------------------------------------------------------------------------
    def predict(self, payload: Any, engine: BoxToMask | None = None) -> dict:
        """Answer one /predict request.

        Args:
            payload: the decoded JSON body ``{tasks, project, label_config, params: {context,
                polygon_tolerance_px}}``.
            engine: the engine to use (default: the one the project serves now; a batch job passes one
                engine for all its requests, so that a version published mid-way does not mix in).

        Returns:
            ``{"results": [{"result", "score", "model_version"[, "error"]}, … one per task], "model_version",
            "errors": [{"task", "error"}], "skipped": [{"task", "region", "reason"}]}``.

        Raises:
            BadRequest: not a JSON object, no tasks or too many, a bad label config, a malformed parameter.
        """
        deadline = time.monotonic() + self.settings.request_deadline_s
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object with a 'tasks' list")
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("the request has no tasks: 'tasks' must be a non-empty list")
        if len(tasks) > self.settings.max_tasks_per_request:
            raise BadRequest(f"the request has {len(tasks)} tasks, more than MAX_TASKS_PER_REQUEST="
                             f"{self.settings.max_tasks_per_request}: select fewer tasks, or use "
                             f"python -m training.prelabel for a whole project")
        if not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("every item of 'tasks' must be a JSON object")
        project = project_id(payload.get("project"))
        if project is None:
            project = project_id(tasks[0].get("project"))
        config_xml = payload.get("label_config") or self._setup_configs.get(project or "")
        if not config_xml:
            raise BadRequest("the request has no 'label_config' (and no /setup was seen for this project)")
        if not isinstance(config_xml, str):
            raise BadRequest(f"'label_config' must be the labeling config as an XML string, got "
                             f"{type(config_xml).__name__}")
        try:
            config = parse_label_config(config_xml)
        except LabelConfigError as e:
            raise BadRequest(str(e)) from e
        params = payload.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"'params' must be a JSON object, got {type(params).__name__}")
        tolerance = params.get("polygon_tolerance_px", self.settings.polygon_tolerance_px)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
                math.isfinite(tolerance) and tolerance >= 0):
            raise BadRequest(f"params.polygon_tolerance_px must be a number >= 0, got {quoted(tolerance, 40)}")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise BadRequest(f"params.context must be a JSON object {{\"result\": [regions]}}, got "
                             f"{type(context).__name__}")
        interactive = context is not None and context.get("result") is not None
        if interactive and not isinstance(context["result"], list):
            raise BadRequest(f"params.context.result must be a list of regions, got {type(context['result']).__name__}")
        context_rects = rectangles(context["result"]) if interactive else None

        engine = engine or self.engines.get(project)
        results, errors, skipped = [], [], []
        for task in tasks:
            tid = task.get("id") if isinstance(task.get("id"), (int, str)) else None
            try:
                if time.monotonic() > deadline:
                    raise TaskError(f"deadline exceeded: REQUEST_DEADLINE_S={self.settings.request_deadline_s} s "
                                    f"passed before this task started (select fewer tasks, or use "
                                    f"python -m training.prelabel)")
                rects, source = (context_rects, "context") if interactive else rectangles_of_task(task)
                regions, score = self._predict_task(task, config, engine, rects, source, float(tolerance), skipped,
                                                    deadline)
                results.append({"result": regions, "score": score, "model_version": engine.model_version})
            except (TaskError, ImageLoadError) as e:
                log.error("task %s: no prediction: %s", quoted(tid, 24), e)
                errors.append({"task": tid, "error": str(e)})
                results.append({"result": [], "score": 0.0, "model_version": engine.model_version, "error": str(e)})
            except Exception as e:  # an engine bug must not sink the other tasks
                log.exception("task %s: internal error", quoted(tid, 24))
                msg = f"internal error ({e.__class__.__name__}); see the backend's log"
                errors.append({"task": tid, "error": msg})
                results.append({"result": [], "score": 0.0, "model_version": engine.model_version, "error": msg})
        return {"results": results, "model_version": engine.model_version, "errors": errors, "skipped": skipped}

    # -- one task ----------------------------------------------------------------------------------
    def _skip(self, skipped: list, tid, box: Any, reason: str) -> None:
        box = box if isinstance(box, (int, str)) and len(str(box)) <= 64 else quoted(box, 40)
        log.warning("task %s, region %s: skipped: %s", tid, box, reason)
        skipped.append({"task": tid, "region": box, "reason": reason})

    def _targets(self, binding: ImageBinding) -> list[Control]:
        """The mask controls answered: the polygon, and the brush when OUTPUT_BRUSH or no polygon."""
        out = [binding.polygon] if binding.polygon is not None else []
        if binding.brush is not None and (self.settings.output_brush or binding.polygon is None):
            out.append(binding.brush)
        return out

    def _boxes(self, tid, rects: list[dict], config: LabelConfig, skipped: list) -> dict[str, list[_Box]]:
        """The rectangles with a known control, a label list and a label the mask controls have, per image."""
        per_image: dict[str, list[_Box]] = {}
        for i, r in enumerate(rects):
            rid = r.get("id", i)
            binding = config.binding_for_box_control(str(r.get("from_name", "")))
            if binding is None:
                self._skip(skipped, tid, rid, f"rectangle from unknown control {quoted(r.get('from_name'), 40)} "
                           f"(box controls: {[c.name for b in config.bindings for c in b.box_controls]})")
                continue
            value = r.get("value")
            if not isinstance(value, dict):
                self._skip(skipped, tid, rid, f"value must be an object with x, y, width, height in percent, got "
                                              f"{type(value).__name__}")
                continue
            labels = value.get("rectanglelabels")
            if not labels:
                self._skip(skipped, tid, rid, "rectangle has no label (value.rectanglelabels is empty)")
                continue
            if not isinstance(labels, list) or not isinstance(labels[0], str):
                self._skip(skipped, tid, rid, f"value.rectanglelabels must be a list of label strings, got "
                                              f"{quoted(labels, 40)}")
                continue
            label = labels[0]
            if not any(target_label(label, t) for t in self._targets(binding)):
                self._skip(skipped, tid, rid, f"unknown label {quoted(label, 40)}: not a label of "
                           + " or ".join(f"{t.tag} {t.name!r}" for t in self._targets(binding)))
                continue
            per_image.setdefault(binding.image_name, []).append(_Box(i, rid, binding, label, value))
        return per_image

    def _predict_task(self, task: dict, config: LabelConfig, engine: BoxToMask, rects: list[dict], source: str,
                      tolerance: float, skipped: list, deadline: float) -> tuple[list[dict], float]:
        tid = task.get("id")
        data = task.get("data")
        if not isinstance(data, dict):
            raise TaskError(f"task {quoted(tid, 24)} has no 'data' object")
        keys = [b.value_key for b in config.bindings]
        if all(task_image_url(data, k) is None for k in keys):
            raise TaskError(f"task {quoted(tid, 24)} has no image field: expected data key(s) {keys}, got "
                            f"{[quoted(k, 40) for k in list(data)[:10]]}")
        if not rects:
            log.info("task %s: no rectangle to segment (source: %s)", quoted(tid, 24), source)
            return [], 0.0
        if len(rects) > self.settings.max_boxes_per_task:
            raise TaskError(f"task {quoted(tid, 24)} has {len(rects)} rectangles, more than MAX_BOXES_PER_TASK="
                            f"{self.settings.max_boxes_per_task}")

        regions: list[dict] = []
        scores: list[float] = []
        for boxes in self._boxes(tid, rects, config, skipped).values():
            binding = boxes[0].binding
            url = task_image_url(data, binding.value_key)
            if not isinstance(url, str):
                raise TaskError(f"task {quoted(tid, 24)}: data[{binding.value_key!r}] must be an image URL or path "
                                f"(a string), got {type(url).__name__}")
            image = self.images.load(url, deadline=deadline)
            h, w = image.shape[:2]
            xyxy = []
            for b in boxes:
                src = rects[b.index]
                ow, oh = src.get("original_width"), src.get("original_height")
                if isinstance(ow, int) and isinstance(oh, int) and (ow, oh) != (w, h):
                    log.warning("task %s, region %s: Label Studio saw a %sx%s image, the backend loaded %dx%d "
                                "(EXIF orientation or a resized copy?); percent coordinates are used as they are",
                                quoted(tid, 24), b.region_id, ow, oh, w, h)
                try:
                    xyxy.append(rectangle_to_xyxy(b.value, w, h))
                except ValueError:
                    xyxy.append(np.full(4, np.nan))
            for part in predict_valid_box_chunks(engine, image, np.stack(xyxy), [b.label for b in boxes],
                                                 deadline=deadline):
                for i, reason in part.skipped:
                    if reason == "non-finite coordinate":
                        reason = "value needs numeric x, y, width, height (percent of the image)"
                    elif reason == DEADLINE_EXCEEDED:
                        reason = (f"deadline exceeded: REQUEST_DEADLINE_S={self.settings.request_deadline_s} s "
                                  f"passed before this box was segmented (fewer boxes per task, or python -m "
                                  f"training.prelabel)")
                    self._skip(skipped, tid, boxes[i].region_id, reason)
                for k, i in enumerate(part.kept):
                    b = boxes[i]
                    made = mask_regions(part.masks, k, b.label, self._targets(binding),
                                        threshold=self.settings.mask_threshold, tolerance_px=tolerance,
                                        min_region_px=self.settings.min_region_px)
                    if not made:
                        self._skip(skipped, tid, b.region_id, "empty mask (no pixel above MASK_THRESHOLD)")
                        continue
                    regions += made
                    scores.append(float(part.masks.scores[k]))
        return regions, (float(np.mean(scores)) if scores else 0.0)
