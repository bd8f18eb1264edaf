"""Export a Label Studio project into COCO-format training and validation sets, with an image cache.

What is read (label-studio-sdk 2.x, ``client.tasks.list(project=…, fields="all")``):

* per task, its **latest** annotation (the one with the greatest ``updated_at``, then id; cancelled and
  empty annotations are ignored); tasks without one are counted as unlabeled, not errors;
* ``rectanglelabels`` regions → **training boxes** (XYXY pixels; a rotated rectangle gives its
  axis-aligned bounding box, :func:`sim_backend.regions.rectangle_to_xyxy`);
* ``polygonlabels`` (and ``brushlabels``) regions the annotators drew or corrected → **ground-truth
  masks for validation** (:func:`sim_backend.regions.polygons_to_mask` / ``brush_rle_to_mask``). A mask
  whose tight box overlaps no rectangle of its task (IoU < :data:`MATCH_IOU`) is an object without a
  drawn box: its tight box is added to the training boxes too. Training never sees a mask.

Validation masks are the project's own images: SIM is box-supervised, and the product's job is to turn
the project's boxes into masks, so box→mask quality on these images is exactly what annotators get.
The box given to the engine at validation is the tight box of the annotator's mask (COCO convention).

Images are fetched with the backend's :class:`sim_backend.images.ImageLoader` (Label Studio URLs with
the API key, http(s), local files; EXIF orientation applied) and cached, decoded and upright, as PNG
in ``<cache>/<project>/images/<task id>-<sha1(url)[:10]>.png``; ``<cache>/<project>/manifest.json``
maps task id → {url, file, width, height, updated_at}. A task is downloaded again only when its image
URL changed or its file is gone (a task update that keeps the URL keeps the image).

Class ids come from the registry's persistent class map (:meth:`training.registry.ModelRegistry.
update_class_map`): old ids never change, new labels get new ids. In the COCO files the category id
is ``class id + 1`` and every known label is listed, so detectron2's contiguous ids equal class ids.

Errors: a broken task (unreadable image, malformed region, unknown image key) is skipped with a
message in :attr:`ProjectExport.skipped` and never sinks the export. When Label Studio itself stops
answering (connection refused, timeout, HTTP 5xx) the export raises :class:`LabelStudioUnavailable`:
the rest of the project cannot be read, so nothing should be trained on a partial copy.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

#: A mask region counts as the object of a rectangle of its task when their boxes overlap this much.
MATCH_IOU = 0.5
#: Default image cache root, relative to the model directory: ``<model dir>/.cache/<project>/images``.
DEFAULT_CACHE_SUBDIR = ".cache"
#: Task data key of Label Studio imports made with blob URLs (``settings.DATA_UNDEFINED_NAME``).
UNDEFINED_DATA_KEY = "$undefined$"
BOX_TYPES = ("rectanglelabels",)
POLYGON_TYPES = ("polygonlabels",)
BRUSH_TYPES = ("brushlabels",)


class ExportError(RuntimeError):
    """The project cannot be exported (unknown project, bad API key, unusable labeling config)."""


class LabelStudioUnavailable(ExportError):
    """Label Studio stopped answering (connection refused or reset, timeout, HTTP 5xx)."""


# --------------------------------------------------------------------------- data classes
@dataclass
class Region:
    """One object of a task's latest annotation.

    Attributes:
        region_id: Label Studio's result ``id`` (stable across exports of the same annotation).
        label: the region's label.
        box: (4,) float64 XYXY in pixels (a rectangle, or the tight box of a mask).
        kind: ``"rectangle"``, ``"polygon"`` or ``"brush"``.
        mask: (H, W) bool ground-truth mask for polygon/brush regions, None for rectangles.
        train: whether the region gives a training box (all rectangles; masks with no matching rectangle).
    """

    region_id: str
    label: str
    box: np.ndarray
    kind: str
    mask: np.ndarray | None = None
    train: bool = True


@dataclass
class ExportedTask:
    """A task with its cached image and the regions of its latest annotation.

    Attributes:
        task_id: Label Studio task id.
        image_url: the task's image field.
        file: cached image path (PNG, upright RGB).
        width, height: image size in pixels.
        annotation_id: id of the latest annotation used.
        regions: its boxes and masks.
    """

    task_id: int
    image_url: str
    file: Path
    width: int
    height: int
    annotation_id: int | None
    regions: list[Region] = field(default_factory=list)

    @property
    def boxes(self) -> list[Region]:
        """Regions that are training boxes."""
        return [r for r in self.regions if r.train]

    @property
    def masks(self) -> list[Region]:
        """Regions with a ground-truth mask (validation)."""
        return [r for r in self.regions if r.mask is not None]


@dataclass
class ProjectExport:
    """Result of :func:`export_tasks`.

    Attributes:
        project: project id.
        image_dir: folder of the cached images (``file_name`` in the COCO files is relative to it).
        tasks: the usable annotated tasks, by task id.
        labels: the class map after this export (index = class id).
        skipped: (task id, reason) of tasks or regions left out.
        n_unlabeled: tasks without a usable annotation.
        downloaded / reused: image cache counters.
        label_config: the project's labeling config (XML), when known.
    """

    project: int | str
    image_dir: Path
    tasks: list[ExportedTask]
    labels: list[str]
    skipped: list[tuple[int | None, str]] = field(default_factory=list)
    n_unlabeled: int = 0
    downloaded: int = 0
    reused: int = 0
    label_config: str = ""

    @property
    def n_boxes(self) -> int:
        return sum(len(t.boxes) for t in self.tasks)

    @property
    def n_masks(self) -> int:
        return sum(len(t.masks) for t in self.tasks)

    def summary(self) -> str:
        """One line of figures for progress output."""
        return (f"{len(self.tasks)} annotated tasks ({self.n_unlabeled} unlabeled, {len(self.skipped)} skipped "
                f"items), {self.n_boxes} training boxes, {self.n_masks} validation masks, {len(self.labels)} "
                f"classes; images: {self.downloaded} downloaded, {self.reused} cached")

    def coco_train(self) -> dict:
        """COCO instances dict of the training boxes (no segmentation), over the tasks that have boxes."""
        return _coco(self, lambda r: r.train, with_masks=False)

    def coco_val(self) -> dict:
        """COCO instances dict of the validation masks (RLE segmentation, bbox = tight box of the mask)."""
        return _coco(self, lambda r: r.mask is not None, with_masks=True)

    def write_coco(self, out_dir: str | os.PathLike) -> tuple[Path, Path | None]:
        """Write ``train.json`` and, when there are validation masks, ``val.json`` into ``out_dir``.

        Returns:
            (train json path, val json path or None).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        train = out / "train.json"
        train.write_text(json.dumps(self.coco_train()))
        val = None
        if self.n_masks:
            val = out / "val.json"
            val.write_text(json.dumps(self.coco_val()))
        return train, val


def _coco(export: ProjectExport, keep: Callable[[Region], bool], with_masks: bool) -> dict:
    from pycocotools import mask as mask_utils

    cat_of = {l: i + 1 for i, l in enumerate(export.labels)}
    images, anns = [], []
    ann_id = 0
    for t in export.tasks:
        regions = [r for r in t.regions if keep(r) and r.label in cat_of]
        if not regions:
            continue
        images.append({"id": int(t.task_id), "file_name": t.file.name, "width": t.width, "height": t.height,
                       "ls_annotation_id": t.annotation_id, "ls_image": t.image_url})
        for r in regions:
            ann_id += 1
            x0, y0, x1, y1 = (float(v) for v in r.box)
            a = {"id": ann_id, "image_id": int(t.task_id), "category_id": cat_of[r.label],
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "ls_region_id": r.region_id}
            if with_masks:
                rle = mask_utils.encode(np.asfortranarray(r.mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                a["segmentation"] = rle
                a["area"] = float(r.mask.sum())
            else:
                a["area"] = (x1 - x0) * (y1 - y0)
            anns.append(a)
    cats = [{"id": i + 1, "name": l, "supercategory": "object"} for i, l in enumerate(export.labels)]
    return {"info": {"description": f"Label Studio project {export.project}"}, "images": images,
            "annotations": anns, "categories": cats}


# --------------------------------------------------------------------------- region parsing
def latest_annotation(task: dict) -> dict | None:
    """The task's latest usable annotation: not cancelled, non-empty result; greatest (updated_at, id)."""
    anns = [a for a in (task.get("annotations") or [])
            if isinstance(a, dict) and not a.get("was_cancelled") and a.get("result")]
    if not anns:
        return None
    return max(anns, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight XYXY pixel box of a bool (H, W) mask (pixel edges: x1 = last column + 1); None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two XYXY boxes (pixels)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def parse_regions(result: list[dict], width: int, height: int, to_name: str | None = None,
                  warn: Callable[[str], None] = lambda m: None) -> list[Region]:
    """Turn an annotation's ``result`` into regions (rectangles = training boxes; polygons/brush = masks).

    Args:
        result: Label Studio result items.
        width, height: the image size in pixels (coordinates are in percent of it).
        to_name: keep only regions on this Image tag (None: all).
        warn: called with a message for each malformed region (which is skipped).

    Returns:
        Regions in result order; masks matched to no rectangle (box IoU < :data:`MATCH_IOU`) also train.
    """
    from sim_backend.regions import brush_rle_to_mask, polygons_to_mask, rectangle_to_xyxy

    rects, masks = [], []
    for item in result:
        if not isinstance(item, dict):
            warn(f"result item is not an object: {item!r:.80}")
            continue
        typ = item.get("type")
        if to_name and item.get("to_name") not in (None, to_name):
            continue
        value = item.get("value") or {}
        rid = str(item.get("id") or f"r{len(rects) + len(masks)}")
        labels = value.get(typ) if typ else None
        if typ not in BOX_TYPES + POLYGON_TYPES + BRUSH_TYPES:
            continue
        if not labels:
            warn(f"region {rid} ({typ}) has no label")
            continue
        label = str(labels[0])
        try:
            if typ in BOX_TYPES:
                box = rectangle_to_xyxy(value, width, height)
                box = np.array([np.clip(box[0], 0, width), np.clip(box[1], 0, height),
                                np.clip(box[2], 0, width), np.clip(box[3], 0, height)])
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    warn(f"region {rid}: box {np.round(box, 1).tolist()} has no area inside the "
                         f"{width}x{height} image")
                    continue
                rects.append(Region(rid, label, box, "rectangle"))
            else:
                if typ in POLYGON_TYPES:
                    pts = value.get("points")
                    if not pts or len(pts) < 3:
                        warn(f"region {rid}: polygon with fewer than 3 points")
                        continue
                    mask = polygons_to_mask([pts], width, height)
                    kind = "polygon"
                else:
                    if value.get("format", "rle") != "rle" or not value.get("rle"):
                        warn(f"region {rid}: brush region without RLE")
                        continue
                    mask = brush_rle_to_mask(value["rle"], width, height)
                    kind = "brush"
                box = mask_box(mask)
                if box is None:
                    warn(f"region {rid}: {kind} covers no pixel")
                    continue
                masks.append(Region(rid, label, box, kind, mask=mask, train=False))
        except (ValueError, TypeError, KeyError, IndexError) as e:
            warn(f"region {rid} ({typ}) is malformed: {e}")
    for m in masks:
        m.train = not any(box_iou(m.box, r.box) >= MATCH_IOU for r in rects)
    return rects + masks


# --------------------------------------------------------------------------- image cache
class ImageCache:
    """Incremental on-disk cache of task images, ``<root>/<project>/images/`` + ``manifest.json``.

    Args:
        root: cache root.
        project: project id.
        loader: a :class:`sim_backend.images.ImageLoader` (fetches with the API key, applies EXIF).
    """

    def __init__(self, root: str | os.PathLike, project: int | str, loader):
        self.dir = Path(root) / str(project)
        self.image_dir = self.dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"
        self.loader = loader
        try:
            self.manifest: dict[str, dict] = json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.manifest = {}
        self.downloaded = 0
        self.reused = 0

    @staticmethod
    def file_name(task_id: int, url: str) -> str:
        """Cache file name of a task image: ``<task id>-<sha1(url)[:10]>.png``."""
        return f"{int(task_id)}-{hashlib.sha1(url.encode()).hexdigest()[:10]}.png"

    def get(self, task_id: int, url: str, updated_at: str | None = None) -> tuple[Path, int, int]:
        """Path and size of the cached image of a task, downloading it when new or changed.

        Returns:
            (path, width, height).

        Raises:
            sim_backend.images.ImageLoadError: the image cannot be fetched or decoded.
        """
        import cv2

        key = str(int(task_id))
        entry = self.manifest.get(key)
        name = self.file_name(task_id, url)
        path = self.image_dir / name
        if entry and entry.get("url") == url and path.is_file():
            self.reused += 1
            entry["updated_at"] = updated_at
            return path, int(entry["width"]), int(entry["height"])
        image = self.loader.load(url)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp.png")
        if not cv2.imwrite(str(tmp), cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {tmp}")
        os.replace(tmp, path)
        if entry and entry.get("file") and entry["file"] != name:
            (self.image_dir / entry["file"]).unlink(missing_ok=True)
        h, w = image.shape[:2]
        self.manifest[key] = {"url": url, "file": name, "width": int(w), "height": int(h), "updated_at": updated_at}
        self.downloaded += 1
        return path, int(w), int(h)

    def save(self) -> None:
        """Write the manifest atomically."""
        tmp = self.manifest_path.with_name(f".manifest.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))
        os.replace(tmp, self.manifest_path)


# --------------------------------------------------------------------------- export
def _is_connection_failure(exc: BaseException) -> bool:
    """Whether an image error comes from a dead server (no answer, reset, timeout, 5xx)."""
    import requests

    cause = exc.__cause__ or exc
    if isinstance(cause, (requests.ConnectionError, requests.Timeout)):
        return True
    return " returned HTTP 5" in str(exc)


def label_studio_alive(url: str, timeout: float = 5.0) -> bool:
    """Whether Label Studio at ``url`` answers ``GET /health`` (any HTTP answer below 500 counts)."""
    import requests

    try:
        return requests.get(url.rstrip("/") + "/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


def export_tasks(tasks: Iterable[dict], label_config: str, project: int | str, cache_dir: str | os.PathLike,
                 registry, loader, progress: Callable[[str], None] | None = None) -> ProjectExport:
    """Build a :class:`ProjectExport` from Label Studio task dicts (the core of :func:`export_project`).

    Args:
        tasks: task dicts as Label Studio returns them (``id``, ``data``, ``annotations``, ``updated_at``).
        label_config: the project's labeling config; its first Image with a RectangleLabels control
            (:func:`sim_backend.label_config.parse_label_config`) names the image data key.
        project: project id (cache folder and class map).
        cache_dir: image cache root.
        registry: :class:`training.registry.ModelRegistry` holding the class map (updated here).
        loader: :class:`sim_backend.images.ImageLoader`.
        progress: called with progress lines (default: print to stderr).

    Returns:
        The export; skipped tasks/regions are listed with their reason.

    Raises:
        ExportError: the labeling config cannot be used.
        LabelStudioUnavailable: Label Studio stopped answering while images were fetched.
    """
    from sim_backend.images import ImageLoadError
    from sim_backend.label_config import LabelConfigError, parse_label_config

    say = progress or (lambda m: print(f"[export] {m}", file=sys.stderr, flush=True))
    try:
        binding = parse_label_config(label_config).bindings[0]
    except LabelConfigError as e:
        raise ExportError(f"project {project}: {e}") from e
    cache = ImageCache(cache_dir, project, loader)
    out_tasks: list[ExportedTask] = []
    skipped: list[tuple[int | None, str]] = []
    n_unlabeled = 0
    ls_url = getattr(loader, "label_studio_url", "")
    seen = 0
    try:
        for task in tasks:
            seen += 1
            tid = task.get("id") if isinstance(task, dict) else None
            try:
                tid = int(tid)
            except (TypeError, ValueError):
                skipped.append((None, f"task without an integer id: {str(task)[:80]}"))
                continue
            ann = latest_annotation(task)
            if ann is None:
                n_unlabeled += 1
                continue
            data = task.get("data") or {}
            # a Local Files / cloud import with blob URLs stores the URL under "$undefined$"
            url = data.get(binding.value_key) or data.get(UNDEFINED_DATA_KEY)
            if not isinstance(url, str) or not url:
                skipped.append((tid, f"task {tid}: no image in data[{binding.value_key!r}]"))
                say(skipped[-1][1] + " (skipped)")
                continue
            try:
                path, w, h = cache.get(tid, url, task.get("updated_at"))
            except ImageLoadError as e:
                if _is_connection_failure(e) and ls_url and not label_studio_alive(ls_url):
                    raise LabelStudioUnavailable(
                        f"Label Studio at {ls_url} stopped answering while fetching the image of task {tid}: {e}") from e
                skipped.append((tid, f"task {tid}: {e}"))
                say(skipped[-1][1] + " (skipped)")
                continue
            warnings: list[str] = []
            regions = parse_regions(ann.get("result") or [], w, h, binding.image_name, warnings.append)
            for m in warnings:
                skipped.append((tid, f"task {tid}: {m}"))
                say(f"task {tid}: {m} (region skipped)")
            if not regions:
                n_unlabeled += 1
                continue
            out_tasks.append(ExportedTask(tid, url, path, w, h, ann.get("id"), regions))
            if seen % 25 == 0:
                say(f"{seen} tasks read, {cache.downloaded} images downloaded, {cache.reused} cached")
    finally:
        cache.save()
    labels = registry.update_class_map(project, [r.label for t in out_tasks for r in t.regions])
    out_tasks.sort(key=lambda t: t.task_id)
    return ProjectExport(project, cache.image_dir, out_tasks, labels, skipped, n_unlabeled,
                         cache.downloaded, cache.reused, label_config)


def connect(url: str, api_key: str, timeout: float = 30.0):
    """A ``label_studio_sdk.LabelStudio`` client (no network call yet).

    Raises:
        ExportError: URL or API key missing.
    """
    from label_studio_sdk.client import LabelStudio

    if not url:
        raise ExportError("no Label Studio URL: pass --url or set LABEL_STUDIO_URL")
    if not api_key:
        raise ExportError("no Label Studio API key: pass --api-key or set LABEL_STUDIO_API_KEY")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout, max_retries=0)


def _sdk_error(e: Exception, url: str, what: str) -> ExportError:
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(e, (httpx.TransportError,)):
        return LabelStudioUnavailable(f"Label Studio at {url} does not answer ({what}): {e.__class__.__name__}: {e}")
    if isinstance(e, ApiError):
        code = e.status_code
        if code is not None and code >= 500:
            return LabelStudioUnavailable(f"Label Studio at {url} failed ({what}): HTTP {code}")
        hint = " (check the API key)" if code in (401, 403) else (" (no such project?)" if code == 404 else "")
        return ExportError(f"Label Studio at {url} refused {what}: HTTP {code}{hint}: {str(e.body)[:200]}")
    return ExportError(f"Label Studio at {url}: {what} failed: {e.__class__.__name__}: {e}")


def iter_project_tasks(client, project: int, url: str, page_size: int = 100) -> Iterator[dict]:
    """Every task of a project with its annotations, as plain dicts (paged by the SDK).

    Raises:
        LabelStudioUnavailable / ExportError: on a transport or HTTP error (even mid-way).
    """
    try:
        for t in client.tasks.list(project=int(project), fields="all", page_size=page_size):
            yield t if isinstance(t, dict) else t.dict()
    except ExportError:
        raise
    except Exception as e:  # httpx / ApiError / pydantic errors from the SDK
        raise _sdk_error(e, url, f"listing the tasks of project {project}") from e


def export_project(project: int, url: str, api_key: str, cache_dir: str | os.PathLike, registry,
                   settings=None, timeout: float = 30.0,
                   progress: Callable[[str], None] | None = None) -> ProjectExport:
    """Export a live Label Studio project (tasks, latest annotations, images) into a :class:`ProjectExport`.

    Args:
        project: Label Studio project id.
        url, api_key: Label Studio base URL and API token.
        cache_dir: image cache root (``<cache_dir>/<project>/images``).
        registry: :class:`training.registry.ModelRegistry` (class map).
        settings: :class:`sim_backend.settings.Settings` for the image loader (limits); the URL, key
            and timeout given here override its fields.
        timeout: seconds for each Label Studio request.

    Raises:
        ExportError: unknown project, refused key, unusable labeling config.
        LabelStudioUnavailable: Label Studio does not answer, or stops answering mid-way.
    """
    from dataclasses import replace

    from sim_backend.images import ImageLoader
    from sim_backend.settings import Settings

    say = progress or (lambda m: print(f"[export] {m}", file=sys.stderr, flush=True))
    client = connect(url, api_key, timeout)
    try:
        proj = client.projects.get(id=int(project))
    except Exception as e:
        raise _sdk_error(e, url, f"reading project {project}") from e
    label_config = getattr(proj, "label_config", None) or ""
    say(f"project {project} ({getattr(proj, 'title', '') or 'untitled'}): listing tasks")
    s = replace(settings or Settings(), label_studio_url=url.rstrip("/"), label_studio_api_key=api_key,
                image_cache_size=0, image_fetch_timeout_s=timeout)
    loader = ImageLoader(s)
    return export_tasks(iter_project_tasks(client, project, url), label_config, project, cache_dir, registry,
                        loader, say)
