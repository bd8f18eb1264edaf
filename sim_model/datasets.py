"""Where the shared real datasets live, and the layout of each.

Every dataset of the shared data folder (``coco-mini``, ``balloon``, ``dsb2018-nuclei``) is COCO
instances format, one folder per split: ``<dataset>/<split>/annotations/instances_<split>.json`` and
``<dataset>/<split>/images/``. The shared folder is ``shared/data`` beside the repository (a checkout
next to ``shared/``, as on the development and CI machines), else ``/work/shared/data``.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_CANDIDATES = (REPO_ROOT.parent / "shared" / "data", Path("/work/shared/data"))


def shared_data_dir() -> Path:
    """The shared data folder: the first of :data:`_CANDIDATES` that exists (the first when none does)."""
    return next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


def coco_mini_dir() -> Path:
    """The coco-mini dataset (one COCO image per category; splits ``train2017`` and ``val2017``)."""
    return shared_data_dir() / "coco-mini"


def split_files(dataset_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(COCO json, image folder) of one split of a dataset folder in the shared layout (module docstring)."""
    d = Path(dataset_dir) / split
    return d / "annotations" / f"instances_{split}.json", d / "images"


__all__ = ["REPO_ROOT", "shared_data_dir", "coco_mini_dir", "split_files"]
