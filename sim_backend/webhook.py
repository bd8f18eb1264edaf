"""Label Studio's webhook events: start retrains, one per project at a time; answer at once.

:func:`on_webhook` is called by the backend's ``POST /webhook`` route:

* ``START_TRAINING`` (the project's "Start Training" button) → :func:`start_retrain`:
  ``python -m training.retrain --project ID`` in a detached background process. Its log is
  ``<model dir>/<project>/logs/retrain-<UTC start time, YYYYmmddTHHMMSSZ>-<pid>.log``, where ``<pid>`` is
  the process id of the backend worker that handled the event, *not* the retrain's (it keeps apart the
  logs of retrains started in the same second by different workers); the file (opened for appending)
  starts with the command line (``$ python -m training.retrain ...``), then the retrain's stdout and
  stderr. Answers
  ``{"status": "started", "pid": <the retrain's pid>, "log": <that path>}``, or ``{"status": "busy", ...}``
  when a retrain of that project is already running or every retrain slot is taken.
* ``ANNOTATION_CREATED`` → when ``RETRAIN_EVERY_N_ANNOTATIONS`` = N > 0, counts the project's new
  annotations in ``<model dir>/<project>/annotation_count.json`` and starts a retrain at the N-th (the
  count restarts at 0 once a retrain is started; while one runs, the count keeps growing and the next
  annotation tries again). N = 0 (default) turns this off.
* any other action → ``{"status": "ignored"}``.

A START_TRAINING or ANNOTATION_CREATED event without a usable project id (none, ``"../../etc"``, ``-1``)
raises :class:`WebhookError` (HTTP 400, the reason in the message). Before anything is written for a
project (its lock, its log folder, its count), the backend asks Label Studio whether the project exists
(:func:`label_studio_project_check`): an unknown project is a 404 and nothing is written; when Label
Studio cannot be asked (no LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, or it does not answer), a 503.

The backend only starts the retrain process; the retrain itself is the ``training`` package's. The
project lock (:class:`sim_model.registry.ProjectLock`) and one of the ``MAX_CONCURRENT_RETRAINS`` retrain
slots (:func:`sim_model.registry.acquire_slot`) are taken here *before* the process starts and handed to
it (``--lock-fd``, ``--slot-fd``): two clicks never start two retrains of a project, and a flood of events
for many projects starts at most N retrains (the others answer "busy"). The operating system releases
both when the retrain ends, also when it crashes.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from typing import Callable

from sim_model.files import atomic_write_text
from sim_model.registry import LOGS_DIR, LockHeld, ProjectLock, acquire_slot

from .label_studio import LabelStudioConnection, LabelStudioError, LabelStudioUnavailable
from .settings import Settings
from .tasks import parse_project_id

log = logging.getLogger(__name__)

COUNT_FILE = "annotation_count.json"


class WebhookError(ValueError):
    """A webhook event that cannot be acted on; ``status`` is the HTTP status to answer (400, 404, 503).

    Args:
        status: HTTP status code.
        message: the reason, fit for the answer (no internal detail).
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def label_studio_project_check(connection: LabelStudioConnection | None) -> Callable[[str], None]:
    """A check that Label Studio knows a project, for :func:`on_webhook`'s ``verify_project``.

    Args:
        connection: Label Studio of the backend's environment (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY),
            or None when they are not set.

    Returns:
        ``check(project_id)``, which returns when Label Studio has the project and raises
        :class:`WebhookError`: 404 when Label Studio answers that it has no such project (or refuses to
        show it), 503 when there is no connection or Label Studio does not answer.
    """
    def check(project: str) -> None:
        if connection is None:
            raise WebhookError(503, "the backend has no Label Studio to check the project against and to "
                                    "retrain from: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        try:
            connection.project(project)
        except LabelStudioUnavailable as e:
            raise WebhookError(503, f"cannot check project {project}: {e}") from None
        except LabelStudioError as e:
            raise WebhookError(404, f"Label Studio has no project {project} that this backend may read: {e}") from None
    return check
#: The repository root: the retrain runs as ``python -m training.retrain`` from here.
REPO_ROOT = Path(__file__).resolve().parent.parent


def start_retrain(project: str, settings: Settings) -> dict:
    """Start ``python -m training.retrain --project ID`` detached, holding the project lock for it.

    Args:
        project: project id.
        settings: ``model_dir``, ``label_studio_url``, ``label_studio_api_key`` (passed to the retrain's
            environment) and ``retrain_args`` (added to its command line).

    Returns:
        ``{"status": "started", "project", "pid", "log"}`` (``pid``: the retrain's process id; ``log``: its
        log file, module docstring) or ``{"status": "busy", "project", "message"}``.

    Raises:
        OSError: the lock files cannot be created, opened or locked, the log folder or the log file
            cannot be created or opened, or the process cannot be started (``subprocess.Popen``). Nothing
            was started then, and both locks are released. Once the process has started, no OSError is
            raised: the reaper thread (which
            collects its exit status, so that it does not stay a zombie) is started first, and a failure
            to record its pid in the lock files is only logged as a warning (the retrain records its own
            pid when it adopts the locks) — the answer is then still "started".
    """
    model_dir = Path(settings.model_dir).resolve()
    lock = ProjectLock(model_dir, project)
    try:
        lock.acquire()
    except LockHeld as e:
        return {"status": "busy", "project": project, "message": str(e)}
    try:
        slot = acquire_slot(model_dir, settings.max_concurrent_retrains)
    except LockHeld as e:
        lock.release()
        return {"status": "busy", "project": project, "message": str(e)}
    except BaseException:  # e.g. OSError: do not keep the project locked by this worker
        lock.release()
        raise
    try:
        log_dir = model_dir / project / LOGS_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"retrain-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
        env = dict(os.environ, MODEL_DIR=str(model_dir))
        if settings.label_studio_url:
            env["LABEL_STUDIO_URL"] = settings.label_studio_url
        if settings.label_studio_api_key:
            env["LABEL_STUDIO_API_KEY"] = settings.label_studio_api_key
        cmd = [sys.executable, "-m", "training.retrain", "--project", project, "--model-dir", str(model_dir),
               "--lock-fd", str(lock.fd), "--slot-fd", str(slot.fd), *settings.retrain_args]
        with open(log_path, "ab") as logf:
            logf.write(f"$ {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(REPO_ROOT), pass_fds=(lock.fd, slot.fd),
                                    start_new_session=True, close_fds=True)
        # first of all, collect the child's exit status when it ends, so that it does not stay a zombie
        threading.Thread(target=proc.wait, daemon=True, name=f"reap-retrain-{proc.pid}").start()
        for held in (lock, slot):
            try:
                held.write_holder(proc.pid)  # informational; the retrain rewrites it when it adopts the lock
            except OSError as e:
                log.warning("retrain of project %s started (pid %d), but its pid could not be recorded in %s: %s",
                            project, proc.pid, held.path, e)
    finally:
        # our copies of the descriptors go; the child's copies keep the locks until it exits
        for held in (lock, slot):
            if held.fd is not None:
                os.close(held.fd)
                held.fd = None
    return {"status": "started", "project": project, "pid": proc.pid, "log": str(log_path)}


def _update_count(model_dir: Path, project: str, reset: bool) -> int:
    """Add one to the project's persisted annotation count (or reset it to 0) under an flock."""
    path = model_dir / project / COUNT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        n = 0
        if not reset:
            try:
                n = int(json.loads(path.read_text()).get("count", 0)) + 1
            except (OSError, ValueError, AttributeError):
                n = 1
        atomic_write_text(path, json.dumps({"count": n}))
    return n


def _payload_project(payload: dict) -> str:
    """The project of a webhook payload (``project`` object or id, else ``task.project``).

    Raises:
        WebhookError: 400 when there is none or it is not a project id.
    """
    project = payload.get("project")
    if project is None and isinstance(payload.get("task"), dict):
        project = payload["task"].get("project")
    try:
        parsed = parse_project_id(project)
    except ValueError as e:
        raise WebhookError(400, f"webhook payload: {e}") from None
    if parsed is None:
        raise WebhookError(400, "webhook payload has no project id (expected 'project': {\"id\": <int>} "
                                "or 'task': {\"project\": <int>})")
    return parsed


def on_webhook(payload: dict, settings: Settings, verify_project: Callable[[str], None] | None = None) -> dict:
    """Handle one Label Studio webhook event (module docstring); never blocks on a retrain.

    Args:
        payload: the webhook JSON, e.g. ``{"action": "START_TRAINING", "project": {"id": 12, ...}}``.
        settings: the backend's :class:`~sim_backend.settings.Settings`.
        verify_project: called with the project id before anything is written for it; raises
            :class:`WebhookError` for a project that must not be (the backend's route passes
            :func:`label_studio_project_check`; None: the caller already knows the project exists).

    Returns:
        A JSON-serialisable dict with ``status`` in ``started``, ``busy``, ``counted``, ``ignored``.

    Raises:
        WebhookError: a payload that is not an object or has no usable project id (400), and whatever
            ``verify_project`` raises (nothing was written then).
        OSError: from :func:`start_retrain` (nothing started then), or the annotation count
            (``ANNOTATION_CREATED``): its lock file or its file cannot be opened, locked or written. The
            count is updated twice: before the retrain starts (then nothing is started) and, to reset it,
            after a retrain started; an OSError there reaches the caller although that retrain runs (the
            backend's route then answers 500).
    """
    if not isinstance(payload, dict):
        raise WebhookError(400, "webhook payload must be a JSON object")
    action = payload.get("action")
    if action not in ("START_TRAINING", "ANNOTATION_CREATED"):
        return {"status": "ignored", "action": action}
    project = _payload_project(payload)
    every = settings.retrain_every_n
    if action == "ANNOTATION_CREATED" and every <= 0:
        return {"status": "ignored", "action": action, "message": "RETRAIN_EVERY_N_ANNOTATIONS is 0 (off)"}
    if verify_project is not None:
        verify_project(project)
    if action == "START_TRAINING":
        return start_retrain(project, settings)
    model_dir = Path(settings.model_dir).resolve()
    count = _update_count(model_dir, project, reset=False)
    if count < every:
        return {"status": "counted", "project": project, "count": count, "every": every}
    out = start_retrain(project, settings)
    if out["status"] == "started":
        _update_count(model_dir, project, reset=True)
    out["count"] = count
    return out


__all__ = ["on_webhook", "start_retrain", "label_studio_project_check", "WebhookError", "COUNT_FILE"]
