"""Mask-quality scores S_k per box and model version: SQLite store, report, and push to Label Studio.

S_k (SIM Eq. 11) is the mean mask probability over the pixels the pseudo mask keeps as foreground;
:meth:`sim_model.box_to_mask.BoxToMask.predict` returns it as each mask's score. After each retrain,
:func:`compute_scores` runs the new version on every training box of the project and stores one row per
(task, region, version) in ``<model dir>/<project>/scores.sqlite``::

    scores(task INTEGER, region TEXT, version TEXT, label TEXT, score REAL,
           x0 REAL, y0 REAL, x1 REAL, y1 REAL, image TEXT, created_at TEXT,
           PRIMARY KEY (task, region, version))

``region`` is the Label Studio result id of the box; the box is in pixels (XYXY).

Command line::

    python -m training.scores --project 12 [--model-dir models] [--version v0003] [--worst 20]
        [--csv scores.csv] [--histogram scores.png] [--push [--url URL --api-key KEY]]

prints the N worst boxes of the version (default: the current one), writes all its rows to a CSV
(worst first) and a histogram PNG, and with ``--push`` recomputes the masks and stores them in Label
Studio as **predictions** (never annotations): polygonlabels regions encoded by
:func:`sim_backend.regions.polygon_regions`, each region's ``score`` = its box's S_k, the task's
``score`` = the lowest S_k of the task (the worst mask decides where a task sorts), ``model_version``
= the backend's name of the version (``sim-v0003``). A task whose masks are all empty gets a prediction without
regions, still scored, so it sorts among the worst. Older predictions of the same model_version on
the task are deleted first, so pushing twice does not duplicate. Sorting the Data Manager's
"Prediction score" column ascending then lists the tasks with the worst masks first.

Exit codes: 0 done; 2 usage error (argparse); 3 nothing to report (no scores for that version);
4 Label Studio unreachable or refused (``--push``).
"""
from __future__ import annotations

import argparse
import csv
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

SCORES_DB = "scores.sqlite"
COLUMNS = ("task", "region", "version", "label", "score", "x0", "y0", "x1", "y1", "image", "created_at")


class ScoreDB:
    """The per-project S_k table (module docstring).

    Args:
        path: the SQLite file (created with its table on first use).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("""CREATE TABLE IF NOT EXISTS scores (
                task INTEGER NOT NULL, region TEXT NOT NULL, version TEXT NOT NULL, label TEXT,
                score REAL NOT NULL, x0 REAL, y0 REAL, x1 REAL, y1 REAL, image TEXT, created_at TEXT,
                PRIMARY KEY (task, region, version))""")
            con.execute("CREATE INDEX IF NOT EXISTS scores_version_score ON scores (version, score)")

    @classmethod
    def for_project(cls, model_dir: str | os.PathLike, project: int | str) -> "ScoreDB":
        """The table of ``<model dir>/<project>/scores.sqlite``."""
        return cls(Path(model_dir) / str(project) / SCORES_DB)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def put(self, rows: Iterable[dict]) -> int:
        """Insert or replace rows (dicts with the keys of :data:`COLUMNS`; ``created_at`` optional).

        Returns:
            number of rows written.
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = [tuple(r.get(c, now if c == "created_at" else None) for c in COLUMNS) for r in rows]
        with self._connect() as con:
            con.executemany(f"INSERT OR REPLACE INTO scores ({', '.join(COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(COLUMNS))})", data)
        return len(data)

    def versions(self) -> list[str]:
        """Versions that have scores, sorted by name."""
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT version FROM scores ORDER BY version")]

    def rows(self, version: str, worst: int | None = None) -> list[dict]:
        """Rows of one version, lowest S_k first (ties by task, region); at most ``worst`` rows."""
        q = "SELECT * FROM scores WHERE version = ? ORDER BY score ASC, task ASC, region ASC"
        args: tuple = (version,)
        if worst is not None:
            q += " LIMIT ?"
            args += (int(worst),)
        with self._connect() as con:
            return [dict(r) for r in con.execute(q, args)]

    def count(self, version: str | None = None) -> int:
        """Number of rows (of one version, or all)."""
        with self._connect() as con:
            if version is None:
                return con.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
            return con.execute("SELECT COUNT(*) FROM scores WHERE version = ?", (version,)).fetchone()[0]


def predict_task(engine, task, image: np.ndarray | None = None):
    """Run a box→mask engine on the training boxes of one exported task.

    Args:
        engine: a :class:`sim_model.box_to_mask.BoxToMask`.
        task: a :class:`training.ls_export.ExportedTask`.
        image: its (H, W, 3) uint8 RGB image (read from the cache when None).

    Returns:
        (regions, masks (K, H, W) float32, scores (K,) float32, skipped [(region, reason)]) for the K
        boxes that pass :func:`sim_model.box_to_mask.check_boxes`.
    """
    import cv2

    from sim_model.box_to_mask import check_boxes

    if image is None:
        bgr = cv2.imread(str(task.file), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read cached image {task.file}")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    regions = task.boxes
    h, w = image.shape[:2]
    if not regions:
        return [], np.zeros((0, h, w), np.float32), np.zeros((0,), np.float32), []
    checks = check_boxes(np.stack([r.box for r in regions]), (h, w))
    ok = [i for i, c in enumerate(checks) if c.ok]
    skipped = [(regions[i], checks[i].reason) for i in range(len(regions)) if not checks[i].ok]
    if not ok:
        return [], np.zeros((0, h, w), np.float32), np.zeros((0,), np.float32), skipped
    boxes = np.stack([checks[i].box for i in ok])
    masks, scores = engine.predict(image, boxes, [regions[i].label for i in ok])
    return [regions[i] for i in ok], np.asarray(masks), np.asarray(scores, np.float32), skipped


def compute_scores(engine, export, version: str, db: ScoreDB,
                   progress: Callable[[str], None] | None = None) -> dict:
    """S_k of every training box of an exported project with one engine, stored under ``version``.

    A task that fails (unreadable cache file, engine error) is skipped with a message; the others
    are scored.

    Returns:
        {"n_boxes": int, "n_tasks": int, "mean": float, "median": float, "skipped": [str]}.
    """
    say = progress or (lambda m: print(f"[scores] {m}", file=sys.stderr, flush=True))
    rows, skipped = [], []
    for n, task in enumerate(export.tasks):
        try:
            regions, _, scores, bad = predict_task(engine, task)
        except Exception as e:  # one bad task never sinks the batch
            skipped.append(f"task {task.task_id}: {e.__class__.__name__}: {e}")
            say(skipped[-1] + " (skipped)")
            continue
        skipped += [f"task {task.task_id} region {r.region_id}: {why}" for r, why in bad]
        for r, s in zip(regions, scores):
            rows.append({"task": task.task_id, "region": r.region_id, "version": version, "label": r.label,
                         "score": float(s), "x0": float(r.box[0]), "y0": float(r.box[1]), "x1": float(r.box[2]),
                         "y1": float(r.box[3]), "image": task.image_url})
        if (n + 1) % 10 == 0 or n + 1 == len(export.tasks):
            say(f"S_k: {n + 1}/{len(export.tasks)} tasks, {len(rows)} boxes")
    db.put(rows)
    s = np.array([r["score"] for r in rows], np.float64)
    return {"n_boxes": len(rows), "n_tasks": len({r["task"] for r in rows}),
            "mean": float(s.mean()) if len(s) else float("nan"),
            "median": float(np.median(s)) if len(s) else float("nan"), "skipped": skipped}


# --------------------------------------------------------------------------- reports
def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write rows (lowest S_k first, as given) with the columns of :data:`COLUMNS`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in COLUMNS})
    return path


def write_histogram(rows: Sequence[dict], path: str | os.PathLike, title: str = "", bins: int = 20) -> Path:
    """Histogram PNG of the S_k values in ``rows`` over [0, 1] (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.array([r["score"] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(s, bins=bins, range=(0.0, 1.0), color="#4477aa", edgecolor="white")
    ax.set_xlabel("mask score S_k (SIM Eq. 11)")
    ax.set_ylabel("boxes")
    stats = f"n={len(s)}" + (f", mean={s.mean():.3f}, median={np.median(s):.3f}" if len(s) else "")
    ax.set_title(f"{title}  ({stats})" if title else stats, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_worst(rows: Sequence[dict]) -> str:
    """Text table of rows: S_k, task, region, label, box (pixels)."""
    lines = [f"{'S_k':>6}  {'task':>7}  {'region':<12} {'label':<16} box XYXY px"]
    for r in rows:
        box = ", ".join(f"{r[k]:.0f}" for k in ("x0", "y0", "x1", "y1"))
        lines.append(f"{r['score']:6.3f}  {r['task']:>7}  {str(r['region']):<12} {str(r['label'])[:16]:<16} [{box}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------- push to Label Studio
def push_predictions(engine, export, version: str, client, db: ScoreDB | None = None, settings=None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Store each task's masks in Label Studio as a prediction scored by S_k (module docstring).

    Args:
        engine: the version's box→mask engine.
        export: :class:`training.ls_export.ProjectExport` (tasks, boxes, cached images, label config).
        version: registry version name (``v0003``); predictions carry ``sim_model_version(version)``.
        client: ``label_studio_sdk.LabelStudio``.
        db: when given, the recomputed S_k are stored in it too.
        settings: :class:`sim_backend.settings.Settings` (mask threshold, polygon tolerance, min region).

    Returns:
        {"tasks": n pushed, "regions": n regions, "skipped": [str]}.
    """
    from sim_model.box_to_mask import sim_model_version
    from sim_backend.label_config import parse_label_config, target_label
    from sim_backend.regions import polygon_regions
    from sim_backend.settings import Settings

    s = settings or Settings.from_env()
    say = progress or (lambda m: print(f"[scores] {m}", file=sys.stderr, flush=True))
    binding = parse_label_config(export.label_config).bindings[0]
    target = binding.polygon
    if target is None:
        raise ValueError("the labeling config has no PolygonLabels control to hold the masks")
    mv = sim_model_version(version)
    pushed, n_regions, skipped, rows = 0, 0, [], []
    for task in export.tasks:
        try:
            regions, masks, scores, bad = predict_task(engine, task)
            skipped += [f"task {task.task_id} region {r.region_id}: {why}" for r, why in bad]
            result = []
            for r, m, sk in zip(regions, masks, scores):
                label = target_label(r.label, target)
                if label is None:
                    skipped.append(f"task {task.task_id} region {r.region_id}: label {r.label!r} not in "
                                   f"{target.name}")
                    continue
                result += polygon_regions(m, float(sk), label, target, threshold=s.mask_threshold,
                                          tolerance_px=s.polygon_tolerance_px, min_region_px=s.min_region_px)
                rows.append({"task": task.task_id, "region": r.region_id, "version": version, "label": r.label,
                             "score": float(sk), "x0": float(r.box[0]), "y0": float(r.box[1]),
                             "x1": float(r.box[2]), "y1": float(r.box[3]), "image": task.image_url})
            if not len(scores):
                continue
            # a task whose masks are all empty still gets its (low) score: it sorts first for review
            for p in client.predictions.list(task=task.task_id):
                if getattr(p, "model_version", None) == mv:
                    client.predictions.delete(id=p.id)
            client.predictions.create(task=task.task_id, result=result, score=float(min(scores)),
                                      model_version=mv)
            pushed += 1
            n_regions += len(result)
        except Exception as e:
            import httpx

            if isinstance(e, httpx.TransportError):
                raise
            skipped.append(f"task {task.task_id}: {e.__class__.__name__}: {e}")
            say(skipped[-1] + " (skipped)")
    if db is not None:
        db.put(rows)
    say(f"pushed {pushed} predictions ({n_regions} polygon regions) as model_version {mv}")
    return {"tasks": pushed, "regions": n_regions, "skipped": skipped}


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.scores", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, help="Label Studio project id")
    p.add_argument("--model-dir", default=None, help="model registry root (default: env MODEL_DIR or ./models)")
    p.add_argument("--version", default=None, help="version to report (default: the current one, else the latest scored)")
    p.add_argument("--worst", type=int, default=20, help="print the N lowest-S_k boxes (default 20)")
    p.add_argument("--csv", default=None, help="write every row of the version to this CSV, worst first")
    p.add_argument("--histogram", default=None, help="write a histogram of S_k to this PNG")
    p.add_argument("--push", action="store_true",
                   help="store the version's masks in Label Studio as predictions scored by S_k")
    p.add_argument("--url", default=None, help="Label Studio URL (default: env LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=None, help="Label Studio API key (default: env LABEL_STUDIO_API_KEY)")
    p.add_argument("--cache-dir", default=None, help="image cache root (default: <model dir>/.cache)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.scores``; returns the exit code (module docstring)."""
    from sim_backend.settings import Settings

    from training.registry import ModelRegistry

    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    model_dir = Path(args.model_dir) if args.model_dir else settings.model_dir
    registry = ModelRegistry(model_dir)
    db = ScoreDB.for_project(model_dir, args.project)
    version = args.version or registry.current_version(args.project) or (db.versions() or [None])[-1]
    if args.push:
        from training import ls_export

        if version is None or not registry.is_complete(args.project, version):
            print(f"error: no complete version {version!r} of project {args.project} to push", file=sys.stderr)
            return 3
        url = args.url or settings.label_studio_url
        key = args.api_key or settings.label_studio_api_key
        cache = Path(args.cache_dir) if args.cache_dir else model_dir / ls_export.DEFAULT_CACHE_SUBDIR
        try:
            export = ls_export.export_project(int(args.project), url, key, cache, registry, settings)
            from sim_model.engines.sim import SIMBoxToMask

            engine = SIMBoxToMask.from_version_dir(registry.version_dir(args.project, version))
            push_predictions(engine, export, version, ls_export.connect(url, key), db, settings)
        except ls_export.ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 4
        except Exception as e:
            import httpx

            if isinstance(e, httpx.TransportError):
                print(f"error: Label Studio at {url} stopped answering: {e}", file=sys.stderr)
                return 4
            raise
    if version is None or db.count(version) == 0:
        print(f"no S_k scores for project {args.project}" + (f" version {version}" if version else "")
              + f" in {db.path}", file=sys.stderr)
        return 3
    rows = db.rows(version)
    s = np.array([r["score"] for r in rows])
    print(f"project {args.project}, version {version}: {len(rows)} boxes, S_k mean {s.mean():.3f}, "
          f"median {np.median(s):.3f}, min {s.min():.3f}, max {s.max():.3f}")
    print(f"{min(args.worst, len(rows))} worst boxes:")
    print(format_worst(rows[: args.worst]))
    if args.csv:
        print(f"wrote {write_csv(rows, args.csv)}")
    if args.histogram:
        print(f"wrote {write_histogram(rows, args.histogram, title=f'project {args.project} {version}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
