"""The load benchmark's harness (sim_backend.load_benchmark): a server that never becomes healthy is a clear
failure, and the temporary model folder is removed in every case. (The benchmark itself is not run here.)"""
from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

from sim_backend import load_benchmark as lb


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_wait_healthy_fails_at_once_when_the_server_exits():
    proc = _python("import sys; sys.exit(3)")
    proc.wait()
    with pytest.raises(lb.ServerNotHealthy, match="exited with status 3"):
        lb.wait_healthy(f"http://127.0.0.1:{lb._free_port()}", proc, timeout_s=60)


def test_wait_healthy_fails_after_the_timeout_when_nothing_answers():
    proc = _python("import time; time.sleep(60)")
    try:
        with pytest.raises(lb.ServerNotHealthy, match=r"did not answer 200 within 0.5 s \(last: URLError"):
            lb.wait_healthy(f"http://127.0.0.1:{lb._free_port()}", proc, timeout_s=0.5)
    finally:
        proc.kill()
        proc.wait()


def test_run_removes_its_temporary_folder_and_says_why_the_server_failed(tmp_path, monkeypatch, capsys):
    real_popen, real_mkdtemp, made = subprocess.Popen, tempfile.mkdtemp, []

    def popen(cmd, **kwargs):  # a "gunicorn" that fails to boot
        return real_popen([sys.executable, "-c", "import sys; sys.stderr.write('boot failed: no app\\n'); "
                           "sys.exit(3)"], **kwargs)

    def mkdtemp(**kwargs):
        made.append(real_mkdtemp(dir=tmp_path, **kwargs))
        return made[-1]

    monkeypatch.setattr(lb, "_clicks", lambda: ([], ["cat"]))
    monkeypatch.setattr(lb, "coco_mini_dir", lambda: tmp_path)
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(lb.ServerNotHealthy, match="(?s)exited with status 3.*boot failed: no app"):
        lb.run(clients=1, seconds=1, workers=1, threads=1, health_timeout_s=30)
    assert len(made) == 1 and list(tmp_path.iterdir()) == []  # the temporary folder is gone

    def fails(*args, **kwargs):
        raise lb.ServerNotHealthy("http://127.0.0.1:1/health did not answer 200 within 1 s")

    monkeypatch.setattr(lb, "run", fails)
    assert lb.main(["--no-write"]) == 2
    assert "error: http://127.0.0.1:1/health did not answer" in capsys.readouterr().err
