"""Mask-quality scores S_k of every box of a project: computed after each retrain, reported, pushed.

S_k (SIM Eq. 11) is the mean mask probability over the pixels the pseudo mask keeps as foreground;
:meth:`sim_model.box_to_mask.BoxToMask.predict` returns it as each mask's score. After each retrain,
:func:`compute_scores` runs the new version on every training box of the project and stores one row per
(task, region, version) in ``<model dir>/<project>/scores.sqlite`` (:mod:`training.score_store`).

Command line::

    python -m training.scores --project 12 [--model-dir models] [--version v0003] [--worst 20]
        [--csv scores.csv] [--histogram scores.png] [--push [--url URL --api-key KEY]]

prints the N worst boxes of the version (default: the current one), writes all its rows to a CSV
(worst first) and a histogram PNG (:mod:`training.score_report`), and with ``--push`` recomputes the
masks and stores them in Label Studio as **predictions** scored by S_k, never annotations
(:func:`training.predictions.push_predictions`, ``model_version`` = the backend's name of the version,
``sim-v0003``).

Exit codes: 0 done; 2 usage error (argparse); 3 nothing to report (no scores for that version);
4 Label Studio unreachable or refused (``--push``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import httpx
import numpy as np

from sim_backend.label_studio import LabelStudioConnection, LabelStudioError
from sim_backend.settings import Settings
from sim_backend.tasks import parse_project_id
from sim_model.box_to_mask import BoxToMask
from sim_model.engines import version_engine
from sim_model.registry import ModelRegistry
from training.ls_export import DEFAULT_CACHE_SUBDIR, ProjectExport, export_project
from training.predictions import predict_task, push_predictions
from training.score_report import format_worst, write_csv, write_histogram
from training.score_store import ScoreDB, score_row


def compute_scores(engine: BoxToMask, export: ProjectExport, version: str, db: ScoreDB,
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
            pred = predict_task(engine, task)
        except Exception as e:  # one bad task never sinks the batch
            skipped.append(f"task {task.task_id}: {e.__class__.__name__}: {e}")
            say(skipped[-1] + " (skipped)")
            continue
        skipped += [f"task {task.task_id} region {task.boxes[i].region_id}: {why}" for i, why in pred.skipped]
        rows += [score_row(task, task.boxes[i], version, pred.masks.scores[k]) for k, i in enumerate(pred.kept)]
        if (n + 1) % 10 == 0 or n + 1 == len(export.tasks):
            say(f"S_k: {n + 1}/{len(export.tasks)} tasks, {len(rows)} boxes")
    db.put(rows)
    s = np.array([r["score"] for r in rows], np.float64)
    return {"n_boxes": len(rows), "n_tasks": len({r["task"] for r in rows}),
            "mean": float(s.mean()) if len(s) else float("nan"),
            "median": float(np.median(s)) if len(s) else float("nan"), "skipped": skipped}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.scores", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, type=parse_project_id, help="Label Studio project id")
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
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    model_dir = Path(args.model_dir) if args.model_dir else settings.model_dir
    registry = ModelRegistry(model_dir)
    db = ScoreDB.for_project(model_dir, args.project)
    version = args.version or registry.current_version(args.project) or (db.versions() or [None])[-1]
    if args.push:
        if version is None or not registry.is_complete(args.project, version):
            print(f"error: no complete version {version!r} of project {args.project} to push", file=sys.stderr)
            return 3
        url = args.url or settings.label_studio_url
        key = args.api_key or settings.label_studio_api_key
        cache = Path(args.cache_dir) if args.cache_dir else model_dir / DEFAULT_CACHE_SUBDIR
        try:
            connection = LabelStudioConnection(url, key)
            export = export_project(args.project, connection, cache, registry, settings)
            engine = version_engine(registry.version_dir(args.project, version))
            push_predictions(engine, export, engine.model_version, connection.client(), db, version, settings)
        except LabelStudioError as e:
            print(f"error: {e}", file=sys.stderr)
            return 4
        except httpx.TransportError as e:
            print(f"error: Label Studio at {url} stopped answering: {e}", file=sys.stderr)
            return 4
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
