"""Model registry: the model versions of each project on disk, the switch of the served one, and the
retrain lock. The backend reads it; training writes it.

This module defines the names of the version files, ``CURRENT``, the class map, the locks and the
``logs/`` folder (the constants below: ``WEIGHTS_FILE`` … ``LOGS_DIR``); everything that reads or writes
them goes through these names. Other modules keep files of their own in a project's folder, named there:
``scores.sqlite`` (``training.score_store.SCORES_DB``), ``annotation_count.json`` and its ``.lock``
(``sim_backend.webhook.COUNT_FILE``), the retrain logs inside ``logs/`` (named by
:func:`sim_backend.webhook.start_retrain`) and the retrain's scratch folder ``.work-<pid>``
(``training.retrain``).

Layout (``*``: defined elsewhere, see above)::

    <root>/<project>/<version>/model.pth      detectron2 checkpoint (weights, iteration, SIM state)
    <root>/<project>/<version>/config.yaml    the detectron2 config the model was trained with
    <root>/<project>/<version>/classes.json   {"labels": ["cat", "dog", ...]}  (index = class id)
    <root>/<project>/<version>/metrics.json   validation metrics of this version
    <root>/<project>/<version>/train_log.txt  training log
    <root>/<project>/<version>/bsss_model.pth, bsss_config.yaml   MISA's BSSS teacher (MISA versions only)
    <root>/<project>/CURRENT                  text: the served version name, replaced atomically
    <root>/<project>/classes.json             the project's class map, stable across versions
    <root>/<project>/scores.sqlite          * S_k per (task, region, version) (the retrain's scores)
    <root>/<project>/annotation_count.json  * the webhook's count of new annotations
    <root>/<project>/retrain.lock             flock-ed by the running retrain (:class:`ProjectLock`)
    <root>/<project>/logs/                    logs of retrains started by the webhook (file names: *)
    <root>/.retrain-slots/slot-<i>.lock       the retrain slots (:func:`acquire_slot`)

Versions are named ``v0001``, ``v0002``… A version directory is written under a temporary name
(``.v0002.tmp-<pid>``) and renamed into place when complete (:meth:`ModelRegistry.create_version`),
so a reader never sees a half-written version; ``CURRENT`` and the JSON files are written with
:func:`sim_model.files.atomic_write_text`, so every switch is atomic. Label Studio sees a version as
the ``model_version`` string :func:`sim_model_version` (``sim-v0003``).

Publishing rule (:meth:`ModelRegistry.publish`): the quality gate compares the box→mask mIoU on the
project's annotator polygons (validation masks) of the new version with that of the engine served
now, measured on the same validation set by the retrain (``metrics["baseline"]``; without it, the
current version's stored ``val.mIoU`` is used). The new version becomes current when
``new >= baseline - tolerance`` and, when GrabCut was measured too (``metrics["grabcut"]``), when
``new >= grabcut - tolerance``: a model serves only if it is as good as the cold start, which is always
at hand; when the new version does not serve and GrabCut beats the served one by more than the
tolerance, the served one is withdrawn and GrabCut serves again. When the project has no validation polygons (``metrics["val"]``
missing or with ``n_masks == 0``), mask quality cannot be measured: the version is published when no
version is served yet, or when the served version was not validated either (both unchecked, the newer
one has seen more boxes); it is kept but not served when the served version was validated on polygons,
because an unchecked model must not replace a checked one. The reason is always returned.

The retrain locks: ``<root>/<project>/retrain.lock``, held with ``fcntl.flock(LOCK_EX | LOCK_NB)`` by the
process that runs the retrain (:class:`ProjectLock`), and one of the ``MAX_CONCURRENT_RETRAINS`` slots
``<root>/.retrain-slots/slot-<i>.lock`` (:func:`acquire_slot`) that bound the retrains running at once. A process that starts a retrain for someone
else (the backend's webhook) takes the lock *before* starting it and hands the locked descriptor over
(:func:`adopt_lock`), so no second retrain can slip in between; the operating system releases the lock
when the holder ends, also when it crashes or is killed (no stale lock files to clean up).
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from sim_model.files import atomic_write_text

CURRENT_FILE = "CURRENT"
WEIGHTS_FILE = "model.pth"
CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
METRICS_FILE = "metrics.json"
TRAIN_LOG_FILE = "train_log.txt"
#: MISA's BSSS teacher of a version trained with MODEL.MISA.ENABLED (its config names them relative to the folder).
TEACHER_WEIGHTS_FILE = "bsss_model.pth"
TEACHER_CONFIG_FILE = "bsss_config.yaml"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE)
LOCK_FILE = "retrain.lock"
SLOTS_DIR = ".retrain-slots"
LOGS_DIR = "logs"
VERSION_RE = re.compile(r"^v(\d{4,})$")
#: Key of the validation metric the gate compares (box→mask mean IoU on annotator polygons, in [0, 1]).
GATE_METRIC = "mIoU"


class ModelVersionError(RuntimeError):
    """A model version directory cannot be read (missing, unreadable or inconsistent file)."""


#: The colour steps a SIM version can serve on top of its map, in the order ``model_version`` names them:
#: ``refine`` (GrabCut seeded from the map, ``TEST.REFINE``) and ``vote`` (the map votes with GrabCut from
#: the rectangle, ``TEST.VOTE``). The retrain's gate measures each combination and records the best.
ENGINE_STEPS = ("refine", "vote")


def engine_variants() -> dict[str, tuple[str, ...]]:
    """The SIM engine's variants by name: the map alone (``"map"``) and each combination of
    :data:`ENGINE_STEPS` (``"refine"``, ``"vote"``, ``"refine+vote"``), fewer steps first; values are the steps."""
    out = {}
    for k in range(len(ENGINE_STEPS) + 1):
        for steps in itertools.combinations(ENGINE_STEPS, k):
            out["+".join(steps) or "map"] = steps
    return out


def sim_model_version(version: str, steps: Iterable[str] = ()) -> str:
    """The ``model_version`` Label Studio sees for a registry version, e.g. ``"v0003"`` → ``"sim-v0003"``;
    with the colour steps it serves (:data:`ENGINE_STEPS`, :func:`served_steps`) appended:
    ``"sim-v0003+refine"``, ``"sim-v0003+vote"``, ``"sim-v0003+refine+vote"``.

    Raises:
        ValueError: an unknown step.
    """
    steps = set(steps)
    unknown = steps - set(ENGINE_STEPS)
    if unknown:
        raise ValueError(f"unknown engine steps {sorted(unknown)}; known: {list(ENGINE_STEPS)}")
    return f"sim-{version}" + "".join(f"+{s}" for s in ENGINE_STEPS if s in steps)


def served_variant_steps(variant: str) -> dict[str, bool]:
    """``metrics["engine"]`` for an engine variant (:func:`engine_variants`), what :func:`served_steps` reads
    back, e.g. ``"vote"`` → ``{"refine": False, "vote": True}``.

    Raises:
        ValueError: an unknown variant.
    """
    steps_of = engine_variants()
    if variant not in steps_of:
        raise ValueError(f"unknown engine variant {variant!r}; known: {list(steps_of)}")
    return {s: s in steps_of[variant] for s in ENGINE_STEPS}


def served_steps(version_dir: str | os.PathLike) -> tuple[str, ...]:
    """The colour steps a version serves on top of its map: those marked true in ``metrics.json``'s
    ``engine`` (e.g. ``{"refine": false, "vote": true}``), which the retrain's gate writes; () when the file
    is missing or unreadable (the map alone). Ordered as :data:`ENGINE_STEPS`."""
    try:
        metrics = json.loads((Path(version_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return ()
    engine = metrics.get("engine") if isinstance(metrics, dict) else None
    if not isinstance(engine, dict):
        return ()
    return tuple(s for s in ENGINE_STEPS if engine.get(s) is True)


def read_classes(path: str | os.PathLike) -> list[str]:
    """The labels of a ``classes.json`` (``{"labels": [...]}``; index = class id).

    Raises:
        ModelVersionError: unreadable, not that shape, or with duplicate labels.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelVersionError(f"{path}: cannot read the class list ({e.__class__.__name__}: {e})") from e
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ModelVersionError(f'{path}: expected {{"labels": ["name", ...]}}, got {str(data)[:200]}')
    if len(set(labels)) != len(labels):
        raise ModelVersionError(f"{path}: duplicate labels in {labels}")
    return labels


def missing_required_files(vdir: str | os.PathLike) -> list[str]:
    """The names of :data:`REQUIRED_FILES` that are not regular files in ``vdir``, in that order.

    This is the one test of a version directory's completeness (:func:`check_version_dir`,
    :meth:`ModelRegistry.is_complete`, :meth:`~ModelRegistry.set_current`,
    :meth:`~ModelRegistry.create_version`). A missing ``vdir`` lacks them all; a symlink to a regular
    file counts as present.

    Returns:
        [] when the directory is complete.

    Raises:
        OSError: a file's status cannot be read for a reason other than its absence (e.g.
            ``PermissionError`` on the folder), as :meth:`pathlib.Path.is_file`.
    """
    vdir = Path(vdir)
    return [f for f in REQUIRED_FILES if not (vdir / f).is_file()]


def check_version_dir(path: str | os.PathLike) -> Path:
    """A version directory that holds every file of :data:`REQUIRED_FILES`.

    Raises:
        ModelVersionError: the directory or one of its files is missing.
    """
    vdir = Path(path)
    if not vdir.is_dir():
        raise ModelVersionError(f"model version directory {vdir} does not exist")
    missing = missing_required_files(vdir)
    if missing:
        raise ModelVersionError(f"model version {vdir} lacks {', '.join(missing)}")
    return vdir


@dataclass
class VersionInfo:
    """One complete version of a project, as listed by :meth:`ModelRegistry.list_versions`.

    Attributes:
        name: version name, e.g. ``"v0003"``.
        path: its directory.
        metrics: the content of its ``metrics.json`` ({} when absent or unreadable).
        current: whether ``CURRENT`` points at it.
    """

    name: str
    path: Path
    metrics: dict = field(default_factory=dict)
    current: bool = False


@dataclass
class PublishDecision:
    """Outcome of :meth:`ModelRegistry.publish`.

    Attributes:
        published: True when ``CURRENT`` now points at the new version.
        version: the version that was judged.
        previous: the version served before the call (None: none, i.e. the cold-start engine).
        reason: one human-readable sentence saying why.
        new_value: the new version's gate metric (None when it has no validation masks).
        baseline_value: the served engine's gate metric on the same validation set (None if unknown).
        tolerance: the allowed drop, in the metric's units (mIoU, [0, 1]).
        cold_start: GrabCut beat both the new and the served version: the served one was withdrawn
            (:meth:`ModelRegistry.clear_current`) and the cold start serves.
    """

    published: bool
    version: str
    previous: str | None
    reason: str
    new_value: float | None = None
    baseline_value: float | None = None
    tolerance: float = 0.0
    cold_start: bool = False

    def as_dict(self) -> dict:
        """JSON-serialisable form (stored in the version's metrics.json under ``"publish"``)."""
        return {k: getattr(self, k) for k in ("published", "version", "previous", "reason", "new_value",
                                              "baseline_value", "tolerance", "cold_start")}


class ModelRegistry:
    """Read and write model versions under one root directory.

    Args:
        root: the model directory (``MODEL_DIR``); created on first write.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths and reading
    def project_dir(self, project: int | str) -> Path:
        """Directory of one Label Studio project's versions."""
        return self.root / str(project)

    def version_dir(self, project: int | str, version: str) -> Path:
        """Directory of one version (it may not exist)."""
        return self.project_dir(project) / version

    def current_version(self, project: int | str) -> str | None:
        """The served version of ``project``, or None when no complete version is current."""
        p = self.project_dir(project) / CURRENT_FILE
        try:
            version = p.read_text().strip()
        except FileNotFoundError:
            return None
        if not version or not self.is_complete(project, version):
            return None
        return version

    def model_version(self, project: int | str, version: str) -> str:
        """The ``model_version`` string of a version (:func:`sim_model_version`, its colour steps included)."""
        return sim_model_version(version, served_steps(self.version_dir(project, version)))

    def clear_current(self, project: int | str) -> None:
        """Atomically serve no version: the cold-start engine serves ``project`` again."""
        if (self.project_dir(project) / CURRENT_FILE).exists():
            atomic_write_text(self.project_dir(project) / CURRENT_FILE, "")

    def is_complete(self, project: int | str, version: str) -> bool:
        """Whether ``version`` exists under its final name with every file of ``REQUIRED_FILES``."""
        return not missing_required_files(self.version_dir(project, version))

    def projects(self) -> list[str]:
        """Names of the project folders under the root, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def set_current(self, project: int | str, version: str) -> None:
        """Atomically make ``version`` the served one.

        Raises:
            FileNotFoundError: if the version directory lacks one of ``REQUIRED_FILES``.
        """
        missing = missing_required_files(self.version_dir(project, version))
        if missing:
            raise FileNotFoundError(f"version {version} of project {project} lacks {missing}")
        atomic_write_text(self.project_dir(project) / CURRENT_FILE, version + "\n")

    def version_names(self, project: int | str) -> list[str]:
        """Names of the complete versions of ``project``, oldest first (temporary dirs excluded)."""
        pdir = self.project_dir(project)
        if not pdir.is_dir():
            return []
        names = [p.name for p in pdir.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        names = [n for n in names if self.is_complete(project, n)]
        return sorted(names, key=lambda n: int(VERSION_RE.match(n).group(1)))

    def read_metrics(self, project: int | str, version: str) -> dict:
        """The version's ``metrics.json`` as a dict ({} when missing or not valid JSON)."""
        try:
            return json.loads((self.version_dir(project, version) / METRICS_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_metrics(self, project: int | str, version: str, metrics: dict) -> None:
        """Atomically (re)write the version's ``metrics.json`` (values made JSON-ready by :func:`jsonable`)."""
        atomic_write_text(self.version_dir(project, version) / METRICS_FILE,
                          json.dumps(jsonable(metrics), indent=2, sort_keys=True))

    def list_versions(self, project: int | str) -> list[VersionInfo]:
        """Every complete version of ``project`` with its metrics, oldest first."""
        cur = self.current_version(project)
        return [VersionInfo(n, self.version_dir(project, n), self.read_metrics(project, n), n == cur)
                for n in self.version_names(project)]

    # ------------------------------------------------------------------ writing versions
    def next_version_name(self, project: int | str) -> str:
        """``v<N+1>`` where N is the highest number used so far (complete or not), 4 digits."""
        pdir = self.project_dir(project)
        hi = 0
        if pdir.is_dir():
            for p in pdir.iterdir():
                m = re.match(r"^\.?v(\d{4,})(\.tmp-\d+)?$", p.name)
                if m:
                    hi = max(hi, int(m.group(1)))
        return f"v{hi + 1:04d}"

    @contextmanager
    def create_version(self, project: int | str) -> Iterator[tuple[str, Path]]:
        """Allocate the next version and write it under a temporary name.

        Usage::

            with registry.create_version(12) as (version, tmp_dir):
                ... write model.pth, config.yaml, classes.json, metrics.json into tmp_dir ...
            # here the directory is <root>/12/<version>, complete

        On a clean exit of the block the temporary directory is renamed to its final name (one
        ``os.rename``, atomic); the version is NOT made current (see :meth:`publish`). On an exception
        the temporary directory is removed and the exception propagates, so no half-written version
        is ever visible under a version name.

        Raises:
            FileNotFoundError: at the end of the block, if a file of ``REQUIRED_FILES`` was not written.
            FileExistsError: if the final name appeared meanwhile (two writers without the project lock).
        """
        pdir = self.project_dir(project)
        pdir.mkdir(parents=True, exist_ok=True)
        version = self.next_version_name(project)
        tmp = pdir / f".{version}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            yield version, tmp
            missing = missing_required_files(tmp)
            if missing:
                raise FileNotFoundError(f"version {version} of project {project} is incomplete: missing {missing}")
            final = pdir / version
            if final.exists():
                raise FileExistsError(f"{final} already exists")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove_stale_temporaries(self, project: int | str, older_than_s: float = 3600.0) -> list[str]:
        """Delete temporary version dirs left by crashed retrains (older than ``older_than_s`` s)."""
        pdir = self.project_dir(project)
        removed = []
        if not pdir.is_dir():
            return removed
        now = time.time()
        for p in pdir.iterdir():
            if p.is_dir() and re.match(r"^\.v\d{4,}\.tmp-\d+$", p.name) and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    # ------------------------------------------------------------------ class map
    def class_map_path(self, project: int | str) -> Path:
        """Path of the project's persistent class map (``<root>/<project>/classes.json``)."""
        return self.project_dir(project) / CLASSES_FILE

    def load_class_map(self, project: int | str) -> list[str]:
        """The project's labels in class-id order ([] before the first export).

        Falls back to the current version's ``classes.json`` when the project file is missing.
        """
        p = self.class_map_path(project)
        if p.is_file():
            return read_classes(p)
        cur = self.current_version(project)
        if cur:
            return read_classes(self.version_dir(project, cur) / CLASSES_FILE)
        return []

    def update_class_map(self, project: int | str, labels: Iterable[str]) -> list[str]:
        """Add the labels not yet in the map, keeping every existing id; write it atomically.

        Args:
            labels: label names seen in this export (any order, duplicates allowed). New ones get the
                next ids in sorted order, so the result does not depend on task order.

        Returns:
            The full label list, index = class id. Existing ids never change; a label that disappeared
            from the project keeps its id.
        """
        labels_now = self.load_class_map(project)
        known = set(labels_now)
        new = sorted({str(l) for l in labels} - known)
        if new or not self.class_map_path(project).is_file():
            labels_now = labels_now + new
            atomic_write_text(self.class_map_path(project), json.dumps({"labels": labels_now}, indent=2))
        return labels_now

    # ------------------------------------------------------------------ publishing
    def publish(self, project: int | str, version: str, metrics: dict, tolerance: float = 0.02) -> PublishDecision:
        """Make ``version`` current if it passes the quality gate (module docstring); say why.

        Args:
            version: a complete version of ``project``.
            metrics: the new version's metrics: ``{"val": {"mIoU": float, "n_masks": int, ...},
                "baseline": {"version": str | None, "mIoU": float, ...}, "grabcut": {"mIoU": ...}}`` where
                ``baseline`` is the engine served before the retrain and ``grabcut`` the cold-start
                engine, measured on the same validation masks (both optional).
            tolerance: largest allowed drop of the gate metric (mIoU, absolute, in [0, 1]).

        Returns:
            :class:`PublishDecision`. The decision is also stored in the version's metrics.json under
            ``"publish"``. A refused version stays on disk (listed, not served).

        Raises:
            FileNotFoundError: if ``version`` is not complete.
            ValueError: if ``tolerance`` is negative or not finite.
        """
        if not self.is_complete(project, version):
            raise FileNotFoundError(f"version {version} of project {project} is not complete")
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
        previous = self.current_version(project)
        val = metrics.get("val") or {}
        new_value = _finite(val.get(GATE_METRIC)) if val.get("n_masks", 1) else None
        baseline = metrics.get("baseline") or {}
        base_value = _finite(baseline.get(GATE_METRIC)) if baseline.get("n_masks", 1) else None
        if base_value is None and previous is not None:
            pval = self.read_metrics(project, previous).get("val") or {}
            base_value = _finite(pval.get(GATE_METRIC)) if pval.get("n_masks", 1) else None
        prev_name = previous or "the cold-start engine"

        if new_value is None:
            if previous is None:
                ok, reason = True, ("no validation polygons in the project: first version published without a "
                                    "mask-quality check (draw or correct a few polygons to enable the gate)")
            elif base_value is None:
                ok, reason = True, (f"no validation polygons: neither {version} nor {previous} could be checked; "
                                    f"the newer version (trained on the current boxes) is published")
            else:
                ok, reason = False, (f"no validation polygons to check {version}, while the served {previous} "
                                     f"was validated (mIoU {base_value:.4f}): kept, not served")
        elif base_value is None:
            ok, reason = True, (f"{version} mIoU {new_value:.4f} on the validation polygons; {prev_name} has no "
                                f"comparable figure: published")
        elif new_value >= base_value - tolerance:
            ok, reason = True, (f"{version} mIoU {new_value:.4f} vs {prev_name} {base_value:.4f} "
                                f"(tolerance {tolerance:g}): published")
        else:
            ok, reason = False, (f"{version} mIoU {new_value:.4f} is worse than {prev_name} {base_value:.4f} by "
                                 f"{base_value - new_value:.4f} > tolerance {tolerance:g}: kept, not served")
        grabcut = metrics.get("grabcut") or {}
        gc_value = _finite(grabcut.get(GATE_METRIC)) if grabcut.get("n_masks", 1) else None
        cold_start = False
        if gc_value is not None and new_value is not None:
            # GrabCut is always at hand: a model serves only if it is at least as good (within the tolerance)
            if ok and new_value < gc_value - tolerance:
                ok, reason = False, (f"{version} mIoU {new_value:.4f} loses to GrabCut {gc_value:.4f} on the same "
                                     f"validation masks by more than the tolerance {tolerance:g}: kept, not served")
            if not ok and previous is not None and base_value is not None and base_value < gc_value - tolerance:
                cold_start = True
                reason += f"; GrabCut also beats the served {previous} ({base_value:.4f}): GrabCut serves again"
        if ok:
            self.set_current(project, version)
        elif cold_start:
            self.clear_current(project)
        decision = PublishDecision(ok, version, previous, reason, new_value, base_value, tolerance, cold_start)
        stored = dict(self.read_metrics(project, version) or metrics)
        stored["publish"] = decision.as_dict()
        self.write_metrics(project, version, stored)
        return decision


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _json_fallback(o):
    """``json.dumps``'s ``default`` hook of :func:`jsonable`: the JSON value of one unknown object."""
    if getattr(o, "ndim", 0) and hasattr(o, "tolist"):  # an array (NumPy, torch) of 1 or more dimensions
        return o.tolist()
    if hasattr(o, "item"):  # a scalar: NumPy scalar, 0-d array or tensor
        return o.item()
    return str(o)


def jsonable(o):
    """A copy of ``o`` made of JSON types only, for ``metrics.json`` and other JSON records.

    Dicts, lists, tuples, strings, numbers, booleans and None are kept (tuples become lists, dict keys
    strings, as ``json`` does; NaN and infinities stay floats, written as ``NaN``/``Infinity``). Other
    objects, at any depth: arrays of one dimension or more (NumPy ``ndarray``, torch ``Tensor``) become
    nested lists (``tolist()``); scalars (NumPy scalars, 0-d arrays and tensors: anything with ``item()``)
    their Python number; anything else, e.g. a :class:`~pathlib.Path`, its ``str()``.

    Raises:
        ValueError: ``o`` contains itself (circular reference, from ``json.dumps``).
        TypeError: a dict key is not a str, int, float, bool or None.
    """
    return json.loads(json.dumps(o, default=_json_fallback))


# ---------------------------------------------------------------------------------------- the retrain locks
class LockHeld(RuntimeError):
    """Another process holds the lock (a retrain of this project, or every retrain slot)."""


class FileLock:
    """An exclusive ``fcntl.flock`` on one file, never waited for.

    Args:
        path: the lock file (created with its folder on first use).
        what: what holding it means, for messages ("a retrain of project 12").

    ``acquire()`` raises :class:`LockHeld` (with the holder's pid when known). The lock is released by
    ``release()``, by closing the descriptor, or by the end of the process (also a crash or a kill).
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "FileLock":
        """Take the lock now, or raise :class:`LockHeld`.

        Raises:
            LockHeld: another open file description holds it.
            OSError: the lock file cannot be created, opened, locked or written (the holder record);
                the lock is then not held and no descriptor is left open.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(f"{self.what} is already running ({self.holder_info() or 'holder unknown'})") from None
            raise
        self.fd = fd
        try:
            self.write_holder(os.getpid())
        except BaseException:
            # not held after all: closing the descriptor drops the lock (no leaked, locked descriptor)
            self.fd = None
            os.close(fd)
            raise
        return self

    def adopt(self, fd: int) -> "FileLock":
        """Take over a locked descriptor inherited from the process that started this one.

        Raises:
            LockHeld: the descriptor is not a lock on this file (checked by re-locking it, which
                succeeds only for the holder's own open file description).
        """
        try:
            st_fd, st_path = os.fstat(fd), os.stat(self.path)
            if (st_fd.st_dev, st_fd.st_ino) != (st_path.st_dev, st_path.st_ino):
                raise LockHeld(f"descriptor {fd} is not {self.path}")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no-op for the holder; fails for anyone else
        except OSError as e:
            raise LockHeld(f"descriptor {fd} does not hold {self.path}: {e}") from None
        self.fd = fd
        self.write_holder(os.getpid())
        return self

    def write_holder(self, pid: int) -> None:
        """Record the holder's pid and start time in the lock file (informational only).

        Raises:
            OSError: the lock file cannot be written (the lock itself is unaffected).
        """
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": pid, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                            time.gmtime())}).encode(), 0)

    def holder_info(self) -> str:
        """"pid N since T" of the holder as recorded in the lock file ("" when unknown)."""
        try:
            d = json.loads(self.path.read_text() or "{}")
            return f"pid {d['pid']} since {d['since']}"
        except (OSError, ValueError, KeyError):
            return ""

    def is_held(self) -> bool:
        """Whether a process holds the lock now (probes with a non-blocking flock)."""
        if self.fd is not None:
            return True
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock, if it got one
        return False

    def release(self) -> None:
        """Release the lock (no-op when not held here)."""
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ProjectLock(FileLock):
    """At most one retrain per project: the lock ``<model dir>/<project>/retrain.lock``."""

    def __init__(self, model_dir: str | os.PathLike, project: int | str):
        super().__init__(Path(model_dir) / str(project) / LOCK_FILE, f"a retrain of project {project}")


def retrain_slots(model_dir: str | os.PathLike, n: int) -> list[FileLock]:
    """The ``n`` slot locks that bound the retrains running at once across projects
    (``<model dir>/.retrain-slots/slot-<i>.lock``; ``MAX_CONCURRENT_RETRAINS``)."""
    return [FileLock(Path(model_dir) / SLOTS_DIR / f"slot-{i}.lock", f"retrain slot {i + 1} of {n}")
            for i in range(max(int(n), 1))]


def acquire_slot(model_dir: str | os.PathLike, n: int) -> FileLock:
    """Take a free retrain slot.

    Raises:
        LockHeld: all ``n`` slots are held (``n`` retrains are running).
    """
    for slot in retrain_slots(model_dir, n):
        try:
            return slot.acquire()
        except LockHeld:
            continue
    raise LockHeld(f"{n} retrain(s) already running in {model_dir} (MAX_CONCURRENT_RETRAINS={n})")


def adopt_slot(fd: int, model_dir: str | os.PathLike, n: int) -> FileLock:
    """The slot that the inherited descriptor ``fd`` locks.

    Raises:
        LockHeld: it locks none of the slots.
    """
    for slot in retrain_slots(model_dir, n):
        try:
            return slot.adopt(fd)
        except LockHeld:
            continue
    raise LockHeld(f"descriptor {fd} holds no retrain slot of {model_dir}")


def adopt_lock(fd: int, model_dir: str | os.PathLike, project: int | str) -> ProjectLock:
    """The project's lock from a descriptor inherited from the process that started this retrain.

    Raises:
        LockHeld: the descriptor is not a lock on this project's lock file.
    """
    lock = ProjectLock(model_dir, project)
    lock.adopt(fd)
    return lock
