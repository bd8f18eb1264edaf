"""Webhook triggers: START_TRAINING starts one detached retrain per project; the lock survives crashes.

The retrains started here are real ``python -m training.retrain`` processes pointed at a port where no
Label Studio listens, so each one fails fast at its export step (exit 4) after having held the lock;
the tests of failures around the start replace the child by ``python -c pass``.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataclasses import replace

from sim_backend import webhook
from sim_backend.settings import Settings, SettingsError
from sim_backend.webhook import on_webhook
from sim_model.datasets import REPO_ROOT as REPO
from sim_model.registry import FileLock, ProjectLock


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def settings(tmp_path):
    return Settings(label_studio_url=_dead_url(), label_studio_api_key="test-key", model_dir=tmp_path / "models")


def _hold_lock(model_dir: Path, project: int) -> subprocess.Popen:
    """A separate process that takes the project's lock and sleeps (a retrain in progress)."""
    code = ("import sys, time; from sim_model.registry import ProjectLock; "
            f"l = ProjectLock({str(model_dir)!r}, {project}).acquire(); print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def _wait_unlocked(model_dir: Path, project: int, timeout: float = 120.0) -> None:
    lock = ProjectLock(model_dir, project)
    t0 = time.time()
    while lock.is_held():
        assert time.time() - t0 < timeout, "the retrain process never released the lock"
        time.sleep(0.2)


def test_start_training_refused_while_locked_and_allowed_after_a_crash(settings):
    settings = replace(settings, retrain_args=Settings.from_env({"RETRAIN_ARGS": "--timeout 3 --max-iter 7"}).retrain_args)
    model_dir = settings.model_dir
    holder = _hold_lock(model_dir, 12)
    try:
        out = on_webhook({"action": "START_TRAINING", "project": {"id": 12}}, settings)
        assert out["status"] == "busy" and f"pid {holder.pid}" in out["message"]
        # another project is not blocked by project 12's lock
        assert ProjectLock(model_dir, 13).is_held() is False
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the "retrain" crashes: the OS drops its lock
        holder.wait()
    assert ProjectLock(model_dir, 12).is_held() is False

    t0 = time.time()
    out = on_webhook({"action": "START_TRAINING", "project": {"id": 12, "title": "x"}}, settings)
    assert time.time() - t0 < 5  # answers at once, the retrain runs in the background
    assert out["status"] == "started" and out["pid"] > 0
    # the started retrain holds the lock from the first instant: a second click is refused
    again = on_webhook({"action": "START_TRAINING", "project": {"id": 12}}, settings)
    assert again["status"] == "busy"
    _wait_unlocked(model_dir, 12)
    log = Path(out["log"]).read_text()
    assert "training.retrain --project 12" in log and "--timeout 3 --max-iter 7" in log  # RETRAIN_ARGS
    assert "FAILED (exit 4)" in log and settings.label_studio_url in log  # says why it stopped
    assert ProjectLock(model_dir, 12).is_held() is False


def test_cron_retrain_exits_3_while_the_lock_is_held(settings):
    holder = _hold_lock(settings.model_dir, 4)
    try:
        r = subprocess.run([sys.executable, "-m", "training.retrain", "--project", "4", "--model-dir",
                            str(settings.model_dir), "--url", settings.label_studio_url, "--api-key", "k"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert r.returncode == 3, r.stderr
    assert "already running" in r.stderr


def test_retrain_every_n_annotations(settings):
    ev = {"action": "ANNOTATION_CREATED", "project": {"id": 21}, "annotation": {"id": 1}, "task": {"id": 5}}
    assert on_webhook(ev, replace(settings, retrain_every_n=0))["status"] == "ignored"
    every3 = replace(settings, retrain_every_n=Settings.from_env({"RETRAIN_EVERY_N_ANNOTATIONS": "3"}).retrain_every_n)
    assert [on_webhook(ev, every3).get("count") for _ in range(2)] == [1, 2]
    out = on_webhook(ev, every3)
    assert out["status"] == "started" and out["count"] == 3
    # the count restarted: the next annotation counts 1 again (persisted on disk, not in memory)
    assert on_webhook(ev, every3) == {"status": "counted", "project": "21", "count": 1, "every": 3}
    _wait_unlocked(settings.model_dir, 21)
    with pytest.raises(SettingsError, match="RETRAIN_EVERY_N_ANNOTATIONS"):
        Settings.from_env({"RETRAIN_EVERY_N_ANNOTATIONS": "-2"})
    with pytest.raises(SettingsError, match="RETRAIN_ARGS"):
        Settings.from_env({"RETRAIN_ARGS": "--max-iter '5"})


def test_other_events_are_ignored(settings):
    assert on_webhook({"action": "ANNOTATION_UPDATED", "project": {"id": 1}}, settings)["status"] == "ignored"
    assert on_webhook({"action": "PROJECT_UPDATED"}, settings)["status"] == "ignored"
    with pytest.raises(webhook.WebhookError, match="no project id") as e:
        on_webhook({"action": "START_TRAINING"}, settings)
    assert e.value.status == 400
    with pytest.raises(webhook.WebhookError, match="must be a JSON object"):
        on_webhook("nonsense", settings)
    assert not (settings.model_dir / "1").exists()  # nothing started, nothing written


def test_a_started_retrain_is_reaped_and_answered_even_if_its_pid_cannot_be_recorded(settings, monkeypatch, caplog):
    real_write_holder, real_popen = FileLock.write_holder, subprocess.Popen
    started = []

    def write_holder(self, pid):  # the backend's own record works; the one naming the child fails
        if pid != os.getpid():
            raise OSError(28, "No space left on device")
        real_write_holder(self, pid)

    def popen(cmd, **kwargs):  # a child that ends at once instead of a real retrain
        started.append(real_popen([sys.executable, "-c", "pass"], **kwargs))
        return started[-1]

    monkeypatch.setattr(FileLock, "write_holder", write_holder)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with caplog.at_level(logging.WARNING, logger="sim_backend.webhook"):
        out = on_webhook({"action": "START_TRAINING", "project": {"id": 7}}, settings)
    assert out["status"] == "started" and out["pid"] == started[0].pid
    assert "could not be recorded" in caplog.text
    t0 = time.time()
    while started[0].returncode is None:  # only the reaper thread's wait() sets it: no zombie
        assert time.time() - t0 < 30, "the child was never reaped"
        time.sleep(0.05)
    _wait_unlocked(settings.model_dir, 7, timeout=30)


def test_a_failed_slot_does_not_leave_the_project_locked(settings, monkeypatch):
    def no_slot(model_dir, n):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(webhook, "acquire_slot", no_slot)
    with pytest.raises(OSError, match="Permission denied"):
        webhook.start_retrain("8", settings)
    assert not ProjectLock(settings.model_dir, 8).is_held()
