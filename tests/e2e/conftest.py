"""Fixtures for end-to-end tests against a real Label Studio (see :mod:`tests.e2e.ls_harness`).

- ``label_studio`` (session): a running :class:`LabelStudioServer` whose Local Files document root is
  ``label_studio.document_root``; put images under it (a sub-folder per test) before adding a storage.
  Without the Label Studio venv (``scripts/install_label_studio.sh``) the tests are skipped with the
  reason, except under ``CI=true``, where that is a failure.
- ``ls_client`` (session): the label-studio-sdk client of that server.
- ``label_studio`` is a stock install: legacy tokens off, its ``api_key`` a Personal Access Token.
- ``start_backend`` (session): ``start_backend(model_dir, **kw) -> BackendServer`` starts our backend
  under gunicorn, connected to ``label_studio`` with its PAT, requiring HTTP basic auth
  (:data:`BACKEND_AUTH`, as a team would run it); every backend started is stopped at the end.
- ``coco_val``: coco-mini val2017 (``dict`` of the annotation json, plus the images folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sim_model.datasets import coco_mini_dir

from tests.e2e import ls_harness

COCO_MINI = coco_mini_dir()
#: The basic auth of the backends started here (BASIC_AUTH_USER / BASIC_AUTH_PASS).
BACKEND_AUTH = ("labelstudio", "e2e-backend-password")


def _require_label_studio() -> None:
    missing = ls_harness.label_studio_missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the real Label Studio is unavailable: {missing}", pytrace=False)
        pytest.skip(missing)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    _require_label_studio()
    root = tmp_path_factory.mktemp("label-studio")
    server = ls_harness.LabelStudioServer(root / "server", root / "document-root")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ls_client(label_studio):
    return label_studio.client()


@pytest.fixture(scope="session")
def start_backend(label_studio, tmp_path_factory):
    started: list[ls_harness.BackendServer] = []

    def start(model_dir: Path, **kw) -> ls_harness.BackendServer:
        workdir = tmp_path_factory.mktemp("backend")
        kw.setdefault("basic_auth", BACKEND_AUTH)
        b = ls_harness.BackendServer(workdir, label_studio_url=label_studio.url, api_key=label_studio.api_key,
                                     model_dir=Path(model_dir), **kw)
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


def _coco_split(split: str) -> dict:
    ann = COCO_MINI / split / "annotations" / f"instances_{split}.json"
    if not ann.exists():
        pytest.fail(f"coco-mini is missing: {ann} (shared data, set SIM_DATA_DIR to the coco-mini folder)", pytrace=False)
    return {"json": json.loads(ann.read_text()), "annotation_file": ann, "images": COCO_MINI / split / "images"}


@pytest.fixture(scope="session")
def coco_val() -> dict:
    """coco-mini val2017: {"json": dict, "annotation_file": Path, "images": Path}."""
    return _coco_split("val2017")


@pytest.fixture(scope="session")
def coco_train() -> dict:
    """coco-mini train2017: {"json": dict, "annotation_file": Path, "images": Path}."""
    return _coco_split("train2017")
