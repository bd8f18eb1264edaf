"""The /predict protocol: Label Studio tasks (+ drawn rectangles) → mask regions, one result per task.

Two modes (DESIGN.md §4):

* **interactive** — ``params.context.result`` holds the rectangle(s) the annotator just drew; each
  becomes a polygonlabels region per connected mask part (and a brushlabels region when the config
  has BrushLabels and ``OUTPUT_BRUSH`` is on) with the box's label;
* **batch** ("Retrieve predictions", no context) — for each task, the rectangles of its latest
  non-cancelled annotation (by ``updated_at``, then ``created_at``, then ``id``) or, when it has no
  annotation, of its latest prediction that holds rectangles (our own polygon-only predictions are
  passed over).

The answer always has exactly one entry per task, in order: ``{"result", "score", "model_version"}``.
A task that fails (no image field, an unreachable or broken image, …) gets an empty result with an
extra ``"error"`` key (Label Studio 1.23 copies only result/score/model_version from each entry, see
``ml/models.py::_get_predictions_from_ml_backend``) and its error is logged; a box that cannot be segmented (zero area, outside the image, unknown label, …) is
skipped with a logged reason. Both are also listed in the response's top-level ``"errors"`` and
``"skipped"`` keys, which Label Studio ignores (it reads ``"results"`` only). All boxes of one image go
to the engine in one ``BoxToMask.predict`` call. Nothing here writes to Label Studio.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from sim_model.box_to_mask import BoxToMask, check_boxes

from .engines import EngineProvider
from .images import ImageLoader, ImageLoadError
from .label_config import ImageBinding, LabelConfig, LabelConfigError, parse_label_config, target_label
from .regions import brush_region, polygon_regions, rectangle_to_xyxy
from .settings import Settings

log = logging.getLogger(__name__)

#: Task data key of Label Studio imports made with bare blob URLs (``settings.DATA_UNDEFINED_NAME``);
#: Label Studio usually renames it to the config's field before /predict, but not always.
UNDEFINED_DATA_KEY = "$undefined$"


class BadRequest(ValueError):
    """The request as a whole is malformed (answered with HTTP 400 and this message)."""


class TaskError(RuntimeError):
    """One task cannot be predicted (it gets an empty result; the other tasks are unaffected)."""


def project_id(value: Any) -> str | None:
    """Label Studio's project field → the project id as a string.

    Label Studio sends ``"<id>.<created_at timestamp>"`` (e.g. ``"12.1700000000"``) in /setup and
    /predict, and a plain int in tasks; both give ``"12"``. None/empty gives None.

    Raises:
        BadRequest: a value whose id part is not an integer.
    """
    if value is None or value == "":
        return None
    if isinstance(value, dict):  # webhook payloads carry the project object
        value = value.get("id")
        if value is None:
            return None
    head = str(value).split(".")[0].strip()
    if not head.isdigit():
        raise BadRequest(f"project {value!r} is not a Label Studio project id")
    return head


def _time_key(item: dict) -> tuple:
    def parse(s):
        if not s:
            return datetime.min
        try:
            dt = datetime.fromisoformat(str(s).replace("Z", "+00:00"))
            return dt.replace(tzinfo=None) if dt.tzinfo is None else dt.astimezone().replace(tzinfo=None)
        except ValueError:
            return datetime.min
    ident = item.get("id")
    return (parse(item.get("updated_at")), parse(item.get("created_at")),
            ident if isinstance(ident, (int, float)) else -1)


def _rectangles(result: Any) -> list[dict]:
    if not isinstance(result, list):
        return []
    return [r for r in result if isinstance(r, dict) and r.get("type") == "rectanglelabels"]


def rectangles_of_task(task: dict) -> tuple[list[dict], str]:
    """The rectangles to segment in batch mode and where they came from.

    Returns:
        (rectanglelabels result items, source): source is ``"annotation <id>"``, ``"prediction <id>"``
        or ``"none"``. The latest non-cancelled annotation wins (even with no rectangle); without
        annotations, the latest prediction that holds rectangles.
    """
    anns = [a for a in (task.get("annotations") or [])
            if isinstance(a, dict) and not a.get("was_cancelled")]
    if anns:
        latest = max(anns, key=_time_key)
        return _rectangles(latest.get("result")), f"annotation {latest.get('id')}"
    preds = [p for p in (task.get("predictions") or []) if isinstance(p, dict) and _rectangles(p.get("result"))]
    if preds:
        latest = max(preds, key=_time_key)
        return _rectangles(latest.get("result")), f"prediction {latest.get('id')}"
    return [], "none"


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
        settings: thresholds, polygon tolerance, OUTPUT_BRUSH.
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
    def predict(self, payload: Any) -> dict:
        """Answer one /predict request.

        Args:
            payload: the decoded JSON body ``{tasks, project, label_config, params: {context,
                polygon_tolerance_px}}``.

        Returns:
            ``{"results": [{"result", "score", "model_version"[, "error"]}, … one per task], "model_version",
            "errors": [{"task", "error"}], "skipped": [{"task", "region", "reason"}]}``.

        Raises:
            BadRequest: not a JSON object, no tasks, a bad label config, a bad parameter.
        """
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object with a 'tasks' list")
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("the request has no tasks: 'tasks' must be a non-empty list")
        if not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("every item of 'tasks' must be a JSON object")
        project = project_id(payload.get("project"))
        if project is None:
            project = project_id(tasks[0].get("project"))
        config_xml = payload.get("label_config") or self._setup_configs.get(project or "")
        if not config_xml:
            raise BadRequest("the request has no 'label_config' (and no /setup was seen for this project)")
        try:
            config = parse_label_config(config_xml)
        except LabelConfigError as e:
            raise BadRequest(str(e)) from e
        params = payload.get("params") or {}
        if not isinstance(params, dict):
            raise BadRequest("'params' must be a JSON object")
        tolerance = params.get("polygon_tolerance_px", self.settings.polygon_tolerance_px)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
                math.isfinite(tolerance) and tolerance >= 0):
            raise BadRequest(f"params.polygon_tolerance_px must be a number >= 0, got {tolerance!r}")
        context = params.get("context")
        interactive = isinstance(context, dict) and context.get("result") is not None
        context_rects = _rectangles(context.get("result")) if interactive else None

        engine = self.engines.get(project)
        results, errors, skipped = [], [], []
        for task in tasks:
            tid = task.get("id")
            try:
                rects, source = (context_rects, "context") if interactive else rectangles_of_task(task)
                regions, score = self._predict_task(task, config, engine, rects, source, float(tolerance), skipped)
                results.append({"result": regions, "score": score, "model_version": engine.model_version})
            except (TaskError, ImageLoadError) as e:
                log.error("task %s: no prediction: %s", tid, e)
                errors.append({"task": tid, "error": str(e)})
                results.append({"result": [], "score": 0.0, "model_version": engine.model_version, "error": str(e)})
            except Exception as e:  # an engine bug must not sink the other tasks
                log.exception("task %s: internal error", tid)
                msg = f"internal error: {e.__class__.__name__}: {e}"
                errors.append({"task": tid, "error": msg})
                results.append({"result": [], "score": 0.0, "model_version": engine.model_version, "error": msg})
        return {"results": results, "model_version": engine.model_version, "errors": errors, "skipped": skipped}

    # -- one task ----------------------------------------------------------------------------------
    def _skip(self, skipped: list, tid, box: Any, reason: str) -> None:
        log.warning("task %s, region %s: skipped: %s", tid, box, reason)
        skipped.append({"task": tid, "region": box, "reason": reason})

    def _targets(self, binding: ImageBinding):
        out = [binding.polygon] if binding.polygon is not None else []
        if binding.brush is not None and (self.settings.output_brush or binding.polygon is None):
            out.append(binding.brush)
        return out

    def _predict_task(self, task: dict, config: LabelConfig, engine: BoxToMask, rects: list[dict], source: str,
                      tolerance: float, skipped: list) -> tuple[list[dict], float]:
        tid = task.get("id")
        data = task.get("data")
        if not isinstance(data, dict):
            raise TaskError(f"task {tid} has no 'data' object")
        keys = [b.value_key for b in config.bindings]
        if not any(k in data for k in keys) and UNDEFINED_DATA_KEY not in data:
            raise TaskError(f"task {tid} has no image field: expected data key(s) {keys}, got {sorted(data)}")
        if not rects:
            log.info("task %s: no rectangle to segment (source: %s)", tid, source)
            return [], 0.0

        # rectangles → boxes with a known control, a label and a target label
        per_image: dict[str, list[_Box]] = {}
        for i, r in enumerate(rects):
            rid = r.get("id", i)
            binding = config.binding_for_box_control(str(r.get("from_name", "")))
            if binding is None:
                self._skip(skipped, tid, rid, f"rectangle from unknown control {r.get('from_name')!r} "
                           f"(box controls: {[c.name for b in config.bindings for c in b.box_controls]})")
                continue
            value = r.get("value") if isinstance(r.get("value"), dict) else {}
            labels = value.get("rectanglelabels") or []
            if not labels:
                self._skip(skipped, tid, rid, "rectangle has no label")
                continue
            label = str(labels[0])
            if not any(target_label(label, t) for t in self._targets(binding)):
                self._skip(skipped, tid, rid, f"unknown label {label!r}: not a label of "
                           + " or ".join(f"{t.tag} {t.name!r} {list(t.labels)}" for t in self._targets(binding)))
                continue
            per_image.setdefault(binding.image_name, []).append(_Box(i, rid, binding, label, value))

        regions: list[dict] = []
        scores: list[float] = []
        for boxes in per_image.values():
            binding = boxes[0].binding
            url = data.get(binding.value_key, data.get(UNDEFINED_DATA_KEY))
            if url is None:
                raise TaskError(f"task {tid} has no image field {binding.value_key!r}")
            image = self.images.load(url)
            h, w = image.shape[:2]
            xyxy = []
            for b in boxes:
                src = rects[b.index]
                ow, oh = src.get("original_width"), src.get("original_height")
                if ow and oh and (int(ow), int(oh)) != (w, h):
                    log.warning("task %s, region %s: Label Studio saw a %sx%s image, the backend loaded %dx%d "
                                "(EXIF orientation or a resized copy?); percent coordinates are used as they are",
                                tid, b.region_id, ow, oh, w, h)
                try:
                    xyxy.append(rectangle_to_xyxy(b.value, w, h))
                except ValueError as e:
                    xyxy.append(np.full(4, np.nan))
                    log.debug("task %s: %s", tid, e)
            checks = check_boxes(np.stack(xyxy), (h, w))
            ok = []
            for b, c in zip(boxes, checks):
                if c.ok:
                    ok.append((b, c.box))
                else:
                    self._skip(skipped, tid, b.region_id, c.reason)
            if not ok:
                continue
            masks, mscores = engine.predict(image, np.stack([c for _, c in ok]).astype(np.float32),
                                            [b.label for b, _ in ok])
            for (b, _), mask, s in zip(ok, masks, mscores):
                made = []
                for t in self._targets(binding):
                    lab = target_label(b.label, t)
                    if lab is None:
                        continue
                    if t.tag == "polygonlabels":
                        made += polygon_regions(mask, float(s), lab, t, threshold=self.settings.mask_threshold,
                                                tolerance_px=tolerance, min_region_px=self.settings.min_region_px)
                    else:
                        br = brush_region(mask, float(s), lab, t, threshold=self.settings.mask_threshold)
                        if br is not None:
                            made.append(br)
                if not made:
                    self._skip(skipped, tid, b.region_id, "empty mask (no pixel above MASK_THRESHOLD)")
                    continue
                regions += made
                scores.append(float(s))
        return regions, (float(np.mean(scores)) if scores else 0.0)
