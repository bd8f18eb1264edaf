"""Start retrains from Label Studio webhooks; one retrain per project at a time.

:func:`on_webhook` is called by the backend's ``POST /webhook`` route and answers at once:

* ``START_TRAINING`` (the project's "Start Training" button) → starts
  ``python -m training.retrain --project ID`` in a detached background process whose output goes to
  ``<model dir>/<project>/logs/retrain-<UTC time>.log``; answers ``{"status": "started", "pid", "log"}``,
  or ``{"status": "busy", ...}`` when a retrain of that project is already running.
* ``ANNOTATION_CREATED`` → when ``RETRAIN_EVERY_N_ANNOTATIONS`` = N > 0, counts the project's new
  annotations in ``<model dir>/<project>/annotation_count.json`` and starts a retrain at the N-th (the
  count restarts at 0 once a retrain is started; while one runs, the count keeps growing and the next
  annotation tries again). N = 0 (default) turns this off.
* any other action → ``{"status": "ignored"}``.

``RETRAIN_ARGS`` (environment of the backend) adds arguments to the retrains started here, e.g.
``RETRAIN_ARGS="--max-iter 500 --tolerance 0.01"`` (split like a shell would, :func:`shlex.split`).

The lock: ``<model dir>/<project>/retrain.lock``, held with ``fcntl.flock(LOCK_EX | LOCK_NB)`` by the
process that runs the retrain. The webhook takes the lock *before* starting the process and hands the
locked file descriptor to it (``--lock-fd``), so no second retrain can slip in between; the lock then
belongs to the retrain alone, and the operating system releases it when that process ends, also when
it crashes or is killed (no stale lock files to clean up). A retrain started by cron takes the same lock
itself (:class:`ProjectLock`) and exits with code 3 when it is held.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOCK_FILE = "retrain.lock"
COUNT_FILE = "annotation_count.json"
ENV_EVERY_N = "RETRAIN_EVERY_N_ANNOTATIONS"
ENV_RETRAIN_ARGS = "RETRAIN_ARGS"


class LockHeld(RuntimeError):
    """Another process holds the project's retrain lock."""


class ProjectLock:
    """The per-project retrain lock (an ``fcntl.flock`` on ``<model dir>/<project>/retrain.lock``).

    Args:
        model_dir: registry root.
        project: project id.

    ``acquire()`` raises :class:`LockHeld` (with the holder's pid when known) instead of waiting.
    The lock is released by ``release()``, by closing the descriptor, or by the end of the process.
    """

    def __init__(self, model_dir: str | os.PathLike, project: int | str):
        self.path = Path(model_dir) / str(project) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "ProjectLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(f"a retrain of project {self.path.parent.name} is already running "
                               f"({self.holder_info() or 'holder unknown'})") from None
            raise
        self.fd = fd
        self.write_holder(os.getpid())
        return self

    def write_holder(self, pid: int) -> None:
        """Record the holder's pid and start time in the lock file (informational only)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": pid, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                            time.gmtime())}).encode(), 0)

    def holder_info(self) -> str:
        try:
            d = json.loads(self.path.read_text() or "{}")
            return f"pid {d['pid']} since {d['since']}"
        except (OSError, ValueError, KeyError):
            return ""

    def is_held(self) -> bool:
        """Whether another process holds the lock now (probes with a non-blocking flock)."""
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
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "ProjectLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def adopt_lock(fd: int, model_dir: str | os.PathLike, project: int | str) -> ProjectLock:
    """Wrap a locked descriptor inherited from :func:`start_retrain` (the retrain's ``--lock-fd``).

    Raises:
        LockHeld: the descriptor is not a lock on this project's lock file (it is checked by
            re-locking it, which succeeds only for the holder's own open file description).
    """
    lock = ProjectLock(model_dir, project)
    try:
        st_fd, st_path = os.fstat(fd), os.stat(lock.path)
        if (st_fd.st_dev, st_fd.st_ino) != (st_path.st_dev, st_path.st_ino):
            raise LockHeld(f"--lock-fd {fd} is not {lock.path}")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no-op for the holder; fails for anyone else
    except OSError as e:
        raise LockHeld(f"--lock-fd {fd} does not hold {lock.path}: {e}") from None
    lock.fd = fd
    lock.write_holder(os.getpid())
    return lock


def _settings_value(settings, attr: str, env: str, default=None):
    v = getattr(settings, attr, None) if settings is not None else None
    return v if v not in (None, "") else os.environ.get(env, default)


def start_retrain(project: int | str, settings=None, extra_args: list[str] | None = None) -> dict:
    """Start ``python -m training.retrain --project ID`` detached, holding the project lock for it.

    Args:
        project: project id.
        settings: :class:`sim_backend.settings.Settings` (``model_dir``, ``label_studio_url``,
            ``label_studio_api_key``); None reads the environment.
        extra_args: more retrain arguments; default: ``RETRAIN_ARGS`` of the environment.

    Returns:
        ``{"status": "started", "project", "pid", "log"}`` or ``{"status": "busy", "project", "message"}``.
    """
    import shlex

    model_dir = Path(_settings_value(settings, "model_dir", "MODEL_DIR", "./models")).resolve()
    if extra_args is None:
        try:
            extra_args = shlex.split(os.environ.get(ENV_RETRAIN_ARGS, ""))
        except ValueError as e:
            return {"status": "error", "project": str(project), "message": f"{ENV_RETRAIN_ARGS}: {e}"}
    lock = ProjectLock(model_dir, project)
    try:
        lock.acquire()
    except LockHeld as e:
        return {"status": "busy", "project": str(project), "message": str(e)}
    try:
        log_dir = model_dir / str(project) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"retrain-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
        env = dict(os.environ)
        env["MODEL_DIR"] = str(model_dir)
        for attr, name in (("label_studio_url", "LABEL_STUDIO_URL"), ("label_studio_api_key", "LABEL_STUDIO_API_KEY")):
            v = _settings_value(settings, attr, name)
            if v:
                env[name] = str(v)
        cmd = [sys.executable, "-m", "training.retrain", "--project", str(project), "--model-dir", str(model_dir),
               "--lock-fd", str(lock.fd)] + list(extra_args or [])
        with open(log_path, "ab") as logf:
            logf.write(f"$ {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(Path(__file__).resolve().parent.parent),
                                    pass_fds=(lock.fd,), start_new_session=True, close_fds=True)
        lock.write_holder(proc.pid)
    finally:
        # our copy of the descriptor goes; the child's copy keeps the lock until it exits
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None
    _reap_later(proc)
    return {"status": "started", "project": str(project), "pid": proc.pid, "log": str(log_path)}


def _reap_later(proc: subprocess.Popen) -> None:
    """Collect the child's exit status in a daemon thread so that it does not stay a zombie."""
    import threading

    threading.Thread(target=proc.wait, daemon=True, name=f"reap-retrain-{proc.pid}").start()


def _count_annotation(model_dir: Path, project: str) -> int:
    """Add one to the project's persisted annotation count (under an flock) and return the new count."""
    path = model_dir / project / COUNT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            n = int(json.loads(path.read_text()).get("count", 0))
        except (OSError, ValueError, AttributeError):
            n = 0
        n += 1
        tmp = path.with_name(f".{COUNT_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"count": n}))
        os.replace(tmp, path)
    return n


def _reset_count(model_dir: Path, project: str) -> None:
    path = model_dir / project / COUNT_FILE
    with open(path.with_suffix(".lock"), "a") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        tmp = path.with_name(f".{COUNT_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"count": 0}))
        os.replace(tmp, path)


def retrain_every_n() -> int:
    """N of ``RETRAIN_EVERY_N_ANNOTATIONS`` (0 = off).

    Raises:
        ValueError: not an integer >= 0.
    """
    raw = os.environ.get(ENV_EVERY_N, "").strip() or "0"
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_EVERY_N}={raw!r} is not an integer") from None
    if n < 0:
        raise ValueError(f"{ENV_EVERY_N}={raw!r} must be >= 0")
    return n


def _project_id(payload: dict) -> str | None:
    p = payload.get("project")
    if isinstance(p, dict):
        p = p.get("id")
    if p is None and isinstance(payload.get("task"), dict):
        p = payload["task"].get("project")
    try:
        return str(int(p))
    except (TypeError, ValueError):
        return None


def on_webhook(payload: dict, settings=None) -> dict:
    """Handle one Label Studio webhook event (module docstring); never blocks on a retrain.

    Args:
        payload: the webhook JSON, e.g. ``{"action": "START_TRAINING", "project": {"id": 12, ...}}``.
        settings: :class:`sim_backend.settings.Settings` (or None: environment).

    Returns:
        A JSON-serialisable dict with ``status`` in ``started``, ``busy``, ``counted``, ``ignored``,
        ``error`` (``message`` says why).
    """
    if not isinstance(payload, dict):
        return {"status": "error", "message": "webhook payload must be a JSON object"}
    action = payload.get("action")
    if action not in ("START_TRAINING", "ANNOTATION_CREATED"):
        return {"status": "ignored", "action": action}
    project = _project_id(payload)
    if project is None:
        return {"status": "error", "action": action, "message": "webhook payload has no project id"}
    if action == "START_TRAINING":
        return start_retrain(project, settings)
    try:
        every = retrain_every_n()
    except ValueError as e:
        return {"status": "error", "action": action, "message": str(e)}
    if every <= 0:
        return {"status": "ignored", "action": action, "message": f"{ENV_EVERY_N} is 0 (off)"}
    model_dir = Path(_settings_value(settings, "model_dir", "MODEL_DIR", "./models")).resolve()
    count = _count_annotation(model_dir, project)
    if count < every:
        return {"status": "counted", "project": project, "count": count, "every": every}
    out = start_retrain(project, settings)
    if out["status"] == "started":
        _reset_count(model_dir, project)
    out["count"] = count
    return out
