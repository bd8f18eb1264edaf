"""Export a Label Studio project into COCO training and validation sets, with an incremental image cache.

What is read (label-studio-sdk, :func:`sim_backend.label_studio.iter_project_tasks`):

* per task, its :func:`sim_backend.tasks.latest_annotation`; tasks without one, or whose latest
  annotation holds no region, are counted as unlabeled, not errors;
* its regions (:func:`sim_backend.tasks.parse_regions`): ``rectanglelabels`` → **training boxes**;
  ``polygonlabels`` / ``brushlabels`` the annotators drew or corrected → **ground-truth masks for
  validation** (a mask with no matching rectangle also gives a training box). Training never sees a mask.

Validation masks are the project's own images: SIM is box-supervised, and the product's job is to turn
the project's boxes into masks, so box→mask quality on these images is exactly what annotators get.
The box given to the engine at validation is the tight box of the annotator's mask (COCO convention).

Images go through :class:`training.image_cache.ImageCache`; class ids through the registry's
persistent class map (:meth:`sim_model.registry.ModelRegistry.update_class_map`): old ids never
change, new labels get new ids. COCO files: :mod:`training.coco`.

Errors: a broken task (unreadable image, malformed region, no image field) is skipped with a message
in :attr:`ProjectExport.skipped` and never sinks the export. When Label Studio itself stops answering
(connection refused, timeout, HTTP 5xx) the export raises
:class:`sim_backend.label_studio.LabelStudioUnavailable`: the rest of the project cannot be read, so
nothing should be trained on a partial copy.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from sim_backend.images import ImageLoader, ImageLoadError
from sim_backend.label_config import LabelConfigError, parse_label_config
from sim_backend.label_studio import (LabelStudioConnection, LabelStudioError, LabelStudioUnavailable,
                                      iter_project_tasks, label_studio_alive)
from sim_backend.settings import Settings
from sim_backend.tasks import Region, latest_annotation, parse_regions, task_image_url
from sim_model.registry import ModelRegistry
from training.coco import coco_dict, held_out, write_coco
from training.image_cache import ImageCache

#: Default image cache root, relative to the model directory: ``<model dir>/.cache/<project>/images``.
DEFAULT_CACHE_SUBDIR = ".cache"


@dataclass
class ExportedTask:
    """A task with its cached image and the regions of its latest annotation.

    Attributes:
        task_id: Label Studio task id.
        image_url: the task's image field.
        file: cached image path (PNG, upright RGB).
        width, height: image size in pixels.
        annotation_id: id of the annotation used.
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
        downloaded, reused: image cache counters.
        label_config: the project's labeling config (XML).
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

    def validation_masks(self, fraction: float) -> set[tuple[int, str]]:
        """(task id, region id) of the masks held out for validation (:func:`training.coco.held_out`);
        when the project has masks but the hash holds none out and ``fraction`` > 0, the first mask is
        (the gate needs one), the others teach."""
        masks = [(t.task_id, r.region_id) for t in self.tasks for r in t.masks]
        out = {m for m in masks if held_out(*m, fraction)}
        if masks and not out and fraction > 0:
            out.add(masks[0])
        return out

    def coco_train(self, val_fraction: float = 1.0) -> dict:
        """COCO instances dict of the training boxes, over the tasks that have boxes; the masks not held
        out (:meth:`validation_masks`) supervise the instance they outline (``segmentation`` +
        ``mask_supervised``). ``val_fraction`` 1: boxes only."""
        held = self.validation_masks(val_fraction)

        def supervision(task: ExportedTask, region: Region):
            for m in task.masks:
                if (task.task_id, m.region_id) in held:
                    continue
                if m.region_id == region.region_id or m.outlines == region.region_id:
                    return m.mask
            return None

        return coco_dict(self.project, self.labels, self.tasks, lambda r: r.train, with_masks=False,
                         supervision=supervision)

    def coco_val(self, val_fraction: float = 1.0) -> dict:
        """COCO instances dict of the held-out masks (RLE segmentation, bbox = tight box of the mask)."""
        held = self.validation_masks(val_fraction)
        kept = [replace(t, regions=[r for r in t.regions if (t.task_id, r.region_id) in held]) for t in self.tasks]
        return coco_dict(self.project, self.labels, kept, lambda r: r.mask is not None, with_masks=True)

    def write_coco(self, out_dir: str | os.PathLike, val_fraction: float = 1.0) -> tuple[Path, Path | None]:
        """Write ``train.json`` and, when masks are held out, ``val.json`` into ``out_dir``.

        Args:
            out_dir: the folder.
            val_fraction: share of the annotators' masks that validate (:meth:`validation_masks`); the
                others supervise training. 1 (default): all validate, training sees boxes only.

        Returns:
            (train json path, val json path or None).
        """
        out = Path(out_dir)
        train = write_coco(out / "train.json", self.coco_train(val_fraction))
        val = write_coco(out / "val.json", self.coco_val(val_fraction)) if self.n_masks else None
        return train, val


def _is_connection_failure(exc: BaseException) -> bool:
    """Whether an image error comes from a dead server (no answer, reset, timeout, 5xx)."""
    return bool(getattr(exc, "transient", False))


def export_tasks(tasks: Iterable[dict], label_config: str, project: int | str, cache_dir: str | os.PathLike,
                 registry: ModelRegistry, loader: ImageLoader,
                 progress: Callable[[str], None] | None = None) -> ProjectExport:
    """Build a :class:`ProjectExport` from Label Studio task dicts (the core of :func:`export_project`).

    Args:
        tasks: task dicts as Label Studio returns them (``id``, ``data``, ``annotations``, ``updated_at``).
        label_config: the project's labeling config; its first Image with a RectangleLabels control
            (:func:`sim_backend.label_config.parse_label_config`) names the image data key.
        project: project id (cache folder and class map).
        cache_dir: image cache root.
        registry: holds the class map (updated here).
        loader: fetches the images.
        progress: called with progress lines (default: print to stderr).

    Returns:
        The export; skipped tasks/regions are listed with their reason.

    Raises:
        LabelStudioError: the labeling config cannot be used.
        LabelStudioUnavailable: Label Studio stopped answering while images were fetched.
    """
    say = progress or (lambda m: print(f"[export] {m}", file=sys.stderr, flush=True))
    try:
        binding = parse_label_config(label_config).bindings[0]
    except LabelConfigError as e:
        raise LabelStudioError(f"project {project}: {e}") from e
    cache = ImageCache(cache_dir, project, loader)
    out_tasks: list[ExportedTask] = []
    skipped: list[tuple[int | None, str]] = []
    n_unlabeled = 0
    ls_url = loader.label_studio_url
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
            if ann is None or not ann.get("result"):
                n_unlabeled += 1
                continue
            url = task_image_url(task.get("data"), binding.value_key)
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


def export_project(project: int | str, connection: LabelStudioConnection, cache_dir: str | os.PathLike,
                   registry: ModelRegistry, settings: Settings | None = None,
                   progress: Callable[[str], None] | None = None) -> ProjectExport:
    """Export a live Label Studio project (tasks, latest annotations, images) into a :class:`ProjectExport`.

    One :class:`sim_backend.label_studio.LabelStudioConnection` serves the API and the image downloads
    (a Personal Access Token is exchanged once and renewed as needed).

    Args:
        project: Label Studio project id.
        connection: Label Studio (URL, key, request timeout).
        cache_dir: image cache root (``<cache_dir>/<project>/images``).
        registry: holds the class map.
        settings: the image loader's limits and allowed image sources (its in-memory image cache is not
            used: images go to the disk cache); downloads time out after the connection's timeout.

    Raises:
        LabelStudioError: unknown project, refused key, unusable labeling config.
        LabelStudioUnavailable: Label Studio does not answer, or stops answering mid-way.
    """
    say = progress or (lambda m: print(f"[export] {m}", file=sys.stderr, flush=True))
    proj = connection.project(project)
    label_config = getattr(proj, "label_config", None) or ""
    say(f"project {project} ({getattr(proj, 'title', '') or 'untitled'}): listing tasks")
    s = replace(settings or Settings(), image_cache_bytes=0, image_fetch_timeout_s=connection.timeout)
    return export_tasks(iter_project_tasks(connection.client(), project, connection.url), label_config, project,
                        cache_dir, registry, ImageLoader(s, connection=connection), say)


__all__ = ["DEFAULT_CACHE_SUBDIR", "ExportedTask", "ProjectExport", "export_tasks", "export_project"]
