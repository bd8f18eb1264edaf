"""Prelabel a whole project: the served engine's masks as predictions of every task with boxes.

Usage::

    python -m training.prelabel --project 12 [--url http://localhost:8080 --api-key TOKEN] [--model-dir models]
        [--limit N] [--dry-run]

Label Studio's "Retrieve predictions" sends every selected task in one /predict request and abandons it
after ``ML_TIMEOUT_PREDICT`` seconds; this command has no such limit. For each task it answers exactly
what the backend would (:class:`sim_backend.predict.Predictor`: the rectangles of the latest annotation,
else of the latest prediction that holds rectangles; polygon and brush regions of the served engine,
:func:`sim_model.engines.served_engine`) and stores it as a **prediction** with the engine's
``model_version`` — never an annotation. It is resumable: a task that already holds a prediction of that
``model_version`` is passed over, so a second run after an interruption continues where the first
stopped, and a run after a new model version is published prelabels every task again. One broken task
(unreachable image, malformed region) is reported and skipped; the others go on.

Progress: a bar with tasks done, tasks/minute and the time left. Exit codes: 0 done (also when some tasks
were skipped), 2 usage error, 4 Label Studio unreachable or refused the key or project.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import httpx
from label_studio_sdk.core.api_error import ApiError

from sim_backend.engines import EngineProvider
from sim_backend.images import ImageLoader
from sim_backend.label_studio import LabelStudioConnection, LabelStudioError, iter_project_tasks, sdk_error
from sim_backend.predict import BadRequest, Predictor
from sim_backend.settings import Settings, SettingsError
from sim_backend.tasks import parse_project_id, rectangles_of_task

EXIT_OK, EXIT_USAGE, EXIT_LABEL_STUDIO = 0, 2, 4


@dataclass
class PrelabelReport:
    """What a run did: counts of tasks, the predictions' model_version, the seconds it took, the skip reasons."""

    model_version: str
    tasks: int = 0
    written: int = 0
    already: int = 0
    no_boxes: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tasks_per_minute(self) -> float:
        """Tasks written per minute of the run."""
        return 60.0 * self.written / self.seconds if self.seconds > 0 else 0.0


def _bar(done: int, total: int, started: float, written: int, width: int = 24) -> str:
    elapsed = time.monotonic() - started
    rate = written / elapsed * 60 if elapsed > 0 and written else 0.0
    left = (total - done) * elapsed / done if done else 0.0
    filled = int(width * done / total) if total else width
    return (f"[prelabel] [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks, {rate:.1f} tasks/min, "
            f"ETA {int(left // 60)}:{int(left % 60):02d}")


def prelabel(project: str, connection: LabelStudioConnection, settings: Settings, limit: int | None = None,
             dry_run: bool = False, out=sys.stdout) -> PrelabelReport:
    """Write the served engine's masks as predictions of every task of ``project`` that has boxes.

    Args:
        project: Label Studio project id.
        connection: Label Studio (its client and the images' authentication).
        settings: the backend's settings (model directory, device, thresholds, image limits).
        limit: stop after writing this many predictions (None: all tasks).
        dry_run: compute the masks but write nothing.
        out: where the progress goes.

    Returns:
        :class:`PrelabelReport`.

    Raises:
        LabelStudioError: the project cannot be read (unknown project, refused key) or has an unusable
            labeling config.
        LabelStudioUnavailable: Label Studio stops answering.
    """
    label_config = connection.project(project).label_config or ""
    client = connection.client()
    tasks = list(iter_project_tasks(client, project, connection.url))
    engines = EngineProvider(settings)
    predictor = Predictor(settings, engines, ImageLoader(settings, connection=connection))
    engine = engines.get(project)  # one engine for the whole run: a version published mid-way does not mix in
    report = PrelabelReport(engine.model_version, tasks=len(tasks))
    tty = getattr(out, "isatty", lambda: False)()
    started, step = time.monotonic(), max(1, len(tasks) // 20)
    for n, task in enumerate(tasks, 1):
        if limit is not None and report.written >= limit:
            break
        tid = task.get("id")
        if any(isinstance(p, dict) and p.get("model_version") == report.model_version
               for p in task.get("predictions") or []):
            report.already += 1
        elif not rectangles_of_task(task)[0]:
            report.no_boxes += 1
        else:
            try:
                answer = predictor.predict({"tasks": [task], "label_config": label_config, "project": project},
                                           engine=engine)
            except BadRequest as e:
                raise LabelStudioError(f"project {project}: {e}") from e
            res = answer["results"][0]
            if "error" in res:
                report.failed.append(f"task {tid}: {res['error']}")
                print(f"[prelabel] task {tid} skipped: {res['error']}", file=out, flush=True)
            else:
                if not dry_run:
                    try:
                        client.predictions.create(task=int(tid), result=res["result"], score=res["score"],
                                                  model_version=res["model_version"])
                        report.written += 1
                    except ApiError as e:
                        if e.status_code not in (400, 404, 422):  # refused key (401/403) or a failing server
                            raise sdk_error(e, connection.url, f"writing the prediction of task {tid}") from e
                        report.failed.append(f"task {tid}: Label Studio refused its prediction (HTTP {e.status_code})")
                        print(f"[prelabel] {report.failed[-1]}", file=out, flush=True)
                    except httpx.TransportError as e:
                        raise sdk_error(e, connection.url, f"writing the prediction of task {tid}") from e
                else:
                    report.written += 1
        if tty or n % step == 0 or n == len(tasks):
            print(_bar(n, len(tasks), started, report.written), end="\r" if tty and n < len(tasks) else "\n",
                  file=out, flush=True)
    report.seconds = time.monotonic() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.prelabel``; returns the exit code (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m training.prelabel", description=__doc__.split("\n\n")[0])
    p.add_argument("--project", required=True, type=parse_project_id, help="Label Studio project id")
    p.add_argument("--url", default=None, help="Label Studio URL (default: env LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=None, help="Label Studio API key (default: env LABEL_STUDIO_API_KEY)")
    p.add_argument("--model-dir", default=None, help="model registry root (default: env MODEL_DIR or ./models)")
    p.add_argument("--limit", type=int, default=None, help="write at most N predictions")
    p.add_argument("--dry-run", action="store_true", help="compute the masks, write nothing")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per Label Studio request (default 30)")
    args = p.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.model_dir:
        settings = replace(settings, model_dir=Path(args.model_dir))
    try:
        conn = LabelStudioConnection(args.url or settings.label_studio_url, args.api_key or settings.label_studio_api_key,
                                     args.timeout)
        report = prelabel(args.project, conn, settings, args.limit, args.dry_run)
    except LabelStudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LABEL_STUDIO
    print(f"[prelabel] project {args.project}: {report.written} predictions written as {report.model_version} in "
          f"{report.seconds:.0f} s ({report.tasks_per_minute:.1f} tasks/min); {report.already} already had one, "
          f"{report.no_boxes} without boxes, {len(report.failed)} skipped for an error")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
