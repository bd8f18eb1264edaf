"""Model registry: ``<model dir>/<project>/<version>/`` with an atomically switched ``CURRENT`` pointer.

Layout::

    <root>/<project>/<version>/model.pth      detectron2 checkpoint (weights, iteration, SIM state)
    <root>/<project>/<version>/config.yaml    the detectron2 config the model was trained with
    <root>/<project>/<version>/classes.json   {"labels": ["cat", "dog", ...]}  (index = class id)
    <root>/<project>/<version>/metrics.json   validation metrics of this version
    <root>/<project>/<version>/train_log.txt  training log
    <root>/<project>/CURRENT                  text: the served version name, replaced with os.replace
    <root>/<project>/classes.json             the project's class map, stable across versions
    <root>/<project>/scores.sqlite            S_k per (task, region, version), see training.scores
    <root>/<project>/retrain.lock             flock-ed by the running retrain, see training.triggers
    <root>/<project>/logs/                    logs of retrains started by the webhook

Versions are named ``v0001``, ``v0002``… A version directory is written under a temporary name
(``.v0002.tmp-<pid>``) and renamed into place when complete (:meth:`ModelRegistry.create_version`),
so a reader never sees a half-written version; ``CURRENT`` is written to a temporary file and
``os.replace``d, so the switch is atomic.

Publishing rule (:meth:`ModelRegistry.publish`): the quality gate compares the box→mask mIoU on the
project's annotator polygons (validation masks) of the new version with that of the engine served
now, measured on the same validation set by the retrain (``metrics["baseline"]``; without it, the
current version's stored ``val.mIoU`` is used). The new version becomes current when
``new >= baseline - tolerance``. When the project has no validation polygons (``metrics["val"]``
missing or with ``n_masks == 0``), mask quality cannot be measured: the version is published when no
version is served yet, or when the served version was not validated either (both unchecked, the newer
one has seen more boxes); it is kept but not served when the served version was validated on polygons,
because an unchecked model must not replace a checked one. The reason is always returned.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from contextlib import contextmanager

CURRENT_FILE = "CURRENT"
REQUIRED_FILES = ("model.pth", "config.yaml", "classes.json")
CLASS_MAP_FILE = "classes.json"
METRICS_FILE = "metrics.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")
#: Key of the validation metric the gate compares (box→mask mean IoU on annotator polygons, in [0, 1]).
GATE_METRIC = "mIoU"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """

    published: bool
    version: str
    previous: str | None
    reason: str
    new_value: float | None = None
    baseline_value: float | None = None
    tolerance: float = 0.0

    def as_dict(self) -> dict:
        """JSON-serialisable form (stored in the version's metrics.json under ``"publish"``)."""
        return {k: getattr(self, k) for k in
                ("published", "version", "previous", "reason", "new_value", "baseline_value", "tolerance")}


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

    def is_complete(self, project: int | str, version: str) -> bool:
        """Whether ``version`` exists under its final name with every file of ``REQUIRED_FILES``."""
        vdir = self.version_dir(project, version)
        return all((vdir / f).is_file() for f in REQUIRED_FILES)

    def set_current(self, project: int | str, version: str) -> None:
        """Atomically make ``version`` the served one.

        Raises:
            FileNotFoundError: if the version directory lacks one of ``REQUIRED_FILES``.
        """
        vdir = self.version_dir(project, version)
        missing = [f for f in REQUIRED_FILES if not (vdir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"version {version} of project {project} lacks {missing}")
        tmp = self.project_dir(project) / f".{CURRENT_FILE}.{os.getpid()}.tmp"
        tmp.write_text(version + "\n")
        os.replace(tmp, self.project_dir(project) / CURRENT_FILE)

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
        """Atomically (re)write the version's ``metrics.json``."""
        _atomic_write_text(self.version_dir(project, version) / METRICS_FILE,
                           json.dumps(metrics, indent=2, sort_keys=True, default=_json_default))

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
            missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
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
        return self.project_dir(project) / CLASS_MAP_FILE

    def load_class_map(self, project: int | str) -> list[str]:
        """The project's labels in class-id order ([] before the first export).

        Falls back to the current version's ``classes.json`` when the project file is missing.
        """
        p = self.class_map_path(project)
        if p.is_file():
            return list(json.loads(p.read_text())["labels"])
        cur = self.current_version(project)
        if cur:
            return list(json.loads((self.version_dir(project, cur) / CLASS_MAP_FILE).read_text())["labels"])
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
            _atomic_write_text(self.class_map_path(project), json.dumps({"labels": labels_now}, indent=2))
        return labels_now

    # ------------------------------------------------------------------ publishing
    def publish(self, project: int | str, version: str, metrics: dict, tolerance: float = 0.02) -> PublishDecision:
        """Make ``version`` current if it passes the quality gate (module docstring); say why.

        Args:
            version: a complete version of ``project``.
            metrics: the new version's metrics: ``{"val": {"mIoU": float, "n_masks": int, ...},
                "baseline": {"version": str | None, "mIoU": float, ...}}`` where ``baseline`` is the
                engine served before the retrain measured on the same validation masks (optional).
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
        if ok:
            self.set_current(project, version)
        decision = PublishDecision(ok, version, previous, reason, new_value, base_value, tolerance)
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


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _format_versions(project, infos: list[VersionInfo]) -> str:
    """Table of versions: name, served mark, validation mIoU/AP, baseline mIoU, publish decision."""
    lines = [f"project {project}: {len(infos)} version(s)",
             f"{'':2}{'version':<8} {'val mIoU':>8} {'val AP':>7} {'served before':>13}  created / decision"]
    for i in infos:
        val, base, pub = i.metrics.get("val") or {}, i.metrics.get("baseline") or {}, i.metrics.get("publish") or {}
        f = lambda d, k, fmt: (fmt % d[k]) if isinstance(d.get(k), (int, float)) else "-"  # noqa: E731
        lines.append(f"{'*' if i.current else ' ':2}{i.name:<8} {f(val, 'mIoU', '%.4f'):>8} {f(val, 'AP', '%.1f'):>7} "
                     f"{f(base, 'mIoU', '%.4f'):>13}  {i.metrics.get('created_at', '?')} "
                     f"{pub.get('reason', '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m training.registry --project ID [--model-dir DIR] [--set-current VERSION]``.

    Lists the project's versions (``*`` = served) with their validation figures and publish decisions;
    ``--set-current`` switches ``CURRENT`` by hand (a rollback), bypassing the quality gate.
    Exit codes: 0 done, 2 usage error, 3 unknown or incomplete version.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.registry", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--project", required=True)
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", "./models"))
    p.add_argument("--set-current", metavar="VERSION", default=None,
                   help="serve this version now (rollback), without the quality gate")
    args = p.parse_args(argv)
    reg = ModelRegistry(args.model_dir)
    if args.set_current:
        try:
            reg.set_current(args.project, args.set_current)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        print(f"project {args.project}: now serving {args.set_current}")
    print(_format_versions(args.project, reg.list_versions(args.project)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
