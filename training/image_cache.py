"""Incremental on-disk cache of a project's task images for training.

Images are fetched with the backend's :class:`sim_backend.images.ImageLoader` (Label Studio URLs with
the API key, http(s), local files; EXIF orientation applied) and cached, decoded and upright, as PNG
in ``<cache>/<project>/images/<task id>-<sha1(url)[:10]>.png``; ``<cache>/<project>/manifest.json``
maps task id → {url, file, width, height, updated_at}. A task is downloaded again only when its image
URL changed or its file is gone (a task update that keeps the URL keeps the image). Files are written
atomically (:mod:`sim_model.files`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np

from sim_backend.images import ImageLoader
from sim_model.files import atomic_write_bytes, atomic_write_text


class ImageCache:
    """``<root>/<project>/images/`` + ``manifest.json`` (module docstring).

    Args:
        root: cache root.
        project: project id.
        loader: fetches and decodes images (raises :class:`sim_backend.images.ImageLoadError`).
    """

    def __init__(self, root: str | os.PathLike, project: int | str, loader: ImageLoader):
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
            (path, width, height) in pixels.

        Raises:
            sim_backend.images.ImageLoadError: the image cannot be fetched or decoded.
            OSError: the cache cannot be written.
        """
        key = str(int(task_id))
        entry = self.manifest.get(key)
        name = self.file_name(task_id, url)
        path = self.image_dir / name
        if entry and entry.get("url") == url and path.is_file():
            self.reused += 1
            entry["updated_at"] = updated_at
            return path, int(entry["width"]), int(entry["height"])
        image = self.loader.load(url)
        ok, png = cv2.imencode(".png", cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"cannot encode the image of task {task_id} as PNG")
        atomic_write_bytes(path, png.tobytes())
        if entry and entry.get("file") and entry["file"] != name:
            (self.image_dir / entry["file"]).unlink(missing_ok=True)
        h, w = image.shape[:2]
        self.manifest[key] = {"url": url, "file": name, "width": int(w), "height": int(h), "updated_at": updated_at}
        self.downloaded += 1
        return path, int(w), int(h)

    def save(self) -> None:
        """Write the manifest atomically."""
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """A cached image as (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: the file is missing or unreadable.
    """
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read cached image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


__all__ = ["ImageCache", "read_rgb"]
