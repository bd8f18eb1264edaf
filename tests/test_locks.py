"""The lock files pin every package once, hold every top-level requirement, and are what the venvs hold.

``scripts/lock.sh`` makes ``locks/project.txt`` and ``locks/label-studio.txt``; ``scripts/install.sh`` syncs
the venvs to them (``uv pip sync``). A drifted venv, a hand-edited lock or a requirement added to
setup.cfg without re-locking fails here.
"""
from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sim_model.datasets import REPO_ROOT
from tests.e2e import ls_harness

LOCKS = REPO_ROOT / "locks"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
#: installed by scripts/install.sh beside the lock: the patched detectron2 wheel and this project (editable)
BESIDE_THE_LOCK = {"pb1-detectron2", "sim-prelabels"}


def _pins(lock: Path) -> dict[str, str]:
    """{canonical name: version} of a lock; fails on any line that is not ``name==version``."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(lock.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{lock.name}:{n}: {line!r} is not pinned to one exact version (name==version)"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{lock.name}:{n}: {name} is pinned twice ({pins[name]} and {m.group(2)})"
        pins[name] = m.group(2)
    return pins


def _top_level(path: Path) -> list[Requirement]:
    lines = (ln.split("#")[0].strip() for ln in path.read_text().splitlines())
    return [Requirement(ln) for ln in lines if ln]


def _setup_cfg_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    text = cfg["options"]["install_requires"] + "\n" + cfg["options.extras_require"]["test"]
    return [Requirement(ln.split("#")[0].strip()) for ln in text.splitlines() if ln.split("#")[0].strip()]


@pytest.mark.parametrize("lock", ["project.txt", "label-studio.txt"])
def test_every_package_of_each_lock_is_pinned_to_exactly_one_version(lock):
    pins = _pins(LOCKS / lock)
    assert len(pins) > 50  # the transitive closure, not the top level


def test_the_project_lock_holds_every_top_level_requirement_at_an_allowed_version():
    pins = _pins(LOCKS / "project.txt")
    for req in _top_level(LOCKS / "project.in") + _setup_cfg_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in locks/project.txt: run bash scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"


def test_the_label_studio_lock_holds_the_tested_label_studio_and_a_sentry_sdk_it_starts_with():
    pins = _pins(LOCKS / "label-studio.txt")
    assert pins["label-studio"] == ls_harness.LS_VERSION
    assert int(pins["sentry-sdk"].split(".")[0]) < 3  # sentry-sdk 3 stops Label Studio 1.23 at start-up
    for req in _top_level(LOCKS / "label-studio.in"):
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), req


def test_the_install_scripts_install_nothing_but_the_locks():
    """No pip/uv call names a package outside a lock, but the bootstrap of the locked uv itself."""
    for script in ("install.sh", "install_label_studio.sh"):
        text = (REPO_ROOT / "scripts" / script).read_text()
        for line in text.splitlines():
            code = line.split("#")[0]
            if re.search(r"pip install|pip wheel", code):
                assert ('"uv==$UV_VERSION"' in code or "--no-deps" in code), f"{script}: {line.strip()}"
    assert 'UV_VERSION=$(sed -n \'s/^uv==' in (REPO_ROOT / "scripts" / "install.sh").read_text()
    assert "uv==" in (LOCKS / "project.txt").read_text()


def _installed(site_python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = subprocess.run([site_python, "-I", "-c", code], check=True, capture_output=True, text=True).stdout
    return {canonicalize_name(k): v for k, v in json.loads(out).items()}


def test_the_project_venv_holds_exactly_its_lock():
    if Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve() and not os.environ.get("VENV"):
        pytest.skip(f"not running in the project's .venv ({sys.prefix})")
    installed = _installed(sys.executable)
    pins = _pins(LOCKS / "project.txt")
    assert {k: v for k, v in installed.items() if k not in BESIDE_THE_LOCK} == pins
    assert BESIDE_THE_LOCK <= set(installed)
    assert importlib.metadata.version("pb1-detectron2") == "0.6"


def test_the_label_studio_venv_holds_exactly_its_lock():
    python = ls_harness.ls_venv_dir() / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but there is no Label Studio venv at {python.parent.parent}")
        pytest.skip(f"no Label Studio venv at {python.parent.parent} (bash scripts/install.sh)")
    assert _installed(str(python)) == _pins(LOCKS / "label-studio.txt")
