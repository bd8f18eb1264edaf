"""Load benchmark of the backend: concurrent interactive clicks against gunicorn on loopback.

Usage (from the repository root)::

    python -m sim_backend.load_benchmark [--clients 20] [--seconds 60] [--workers 2] [--threads 2]
        [--max-requests N] [--kill-worker-after S] [--health-timeout S] [--no-write]

It starts ``gunicorn sim_backend.wsgi:app`` on a free 127.0.0.1 port (the README's flags; GrabCut, the
cold-start engine; coco-mini val2017 images as local files under ``LOCAL_FILES_ROOTS``), then runs
``--clients`` threads that each send one-box interactive ``/predict`` requests, one after the other, for
``--seconds`` seconds (a random ground-truth box of a random image, seeded); the run stops by itself.
It reports throughput, latency percentiles, errors and each worker's resident memory at start and end,
prints them and merges them into ``docs/benchmarks.json`` / ``.md`` (table ``backend-load``).
Targets on 2 cores: 20 concurrent clicks, 0 errors, p95 ≤ 1.5 s, worker RSS growth ≤ 300 MB.
``--kill-worker-after S`` sends SIGKILL to one worker S seconds in and reports how many requests failed
(those the worker had accepted: in its threads and its queue) and how many failed later than 2 s after
the kill (none should), and how long gunicorn took to start its replacement.

The server's model folder (empty: the cold-start engine) and its stderr log live in a temporary folder
that is removed at the end, also on failure. When the server does not answer ``/health`` within
``--health-timeout`` seconds (or exits first), the run stops with :class:`ServerNotHealthy`: the command
prints the reason and the end of gunicorn's stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from sim_model.datasets import REPO_ROOT, coco_mini_dir, split_files
from sim_model.results import machine_description, record_results

#: Table of docs/benchmarks.json / .md that the results go to.
TABLE = "backend-load"
#: Seconds the server gets to answer ``/health`` after its start (``--health-timeout``).
HEALTH_TIMEOUT_S = 120.0


class ServerNotHealthy(RuntimeError):
    """The backend under test exited, or did not answer ``GET /health`` with 200 in time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _clicks(seed: int = 0):
    """Every (image path, width, height, label, xywh) of coco-mini val2017, and the label names."""
    ann, images = split_files(coco_mini_dir(), "val2017")
    coco = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    info = {im["id"]: im for im in coco["images"]}
    out = [(str(images / info[a["image_id"]]["file_name"]), info[a["image_id"]]["width"],
            info[a["image_id"]]["height"], names[a["category_id"]], a["bbox"])
           for a in coco["annotations"] if not a.get("iscrowd")]
    return out, [names[k] for k in sorted(names)]


def _config(labels: list[str]) -> str:
    """The labeling config of the clicks: ``labels`` (coco-mini's 80) on Image + RectangleLabels +
    PolygonLabels + BrushLabels."""
    items = "".join(f'<Label value="{label}"/>' for label in labels)
    return (f'<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">{items}'
            f'</RectangleLabels><PolygonLabels name="poly" toName="image">{items}</PolygonLabels>'
            f'<BrushLabels name="brush" toName="image">{items}</BrushLabels></View>')


def _payload(click, config: str, n: int) -> bytes:
    path, w, h, label, (x, y, bw, bh) = click
    rect = {"id": f"c{n}", "type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 100 * bw / w,
                                            "height": 100 * bh / h, "rotation": 0, "rectanglelabels": [label]}}
    return json.dumps({"project": "1.1", "label_config": config, "tasks": [{"id": n, "data": {"image": path}}],
                       "params": {"context": {"result": [rect]}}}).encode()


def _tail(path: Path, n: int = 20) -> str:
    """The last ``n`` lines of a text file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
    """Wait until ``GET <base>/health`` answers 200, polling every 0.3 s.

    Args:
        base: the server's URL, e.g. ``"http://127.0.0.1:8123"``.
        proc: the server process (an exit stops the wait at once).
        timeout_s: the longest wait, in seconds.

    Returns:
        The seconds waited.

    Raises:
        ServerNotHealthy: ``proc`` exited, or ``timeout_s`` passed without a 200; the message says which,
            with the last answer or connection error.
    """
    t0 = time.monotonic()
    last = "no answer"
    while True:
        code = proc.poll()
        if code is not None:
            raise ServerNotHealthy(f"the server exited with status {code} before {base}/health answered")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
                last = f"HTTP {r.status}"
        except OSError as e:  # refused while starting; HTTPError (an OSError) for a 4xx/5xx answer
            last = f"{e.__class__.__name__}: {e}"
        if time.monotonic() - t0 >= timeout_s:
            raise ServerNotHealthy(f"{base}/health did not answer 200 within {timeout_s:g} s (last: {last})")
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server and wait for it (SIGKILL when it takes more than 60 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(clients: int, seconds: float, workers: int, threads: int, max_requests: int | None = None,
        kill_after: float | None = None, health_timeout_s: float = HEALTH_TIMEOUT_S) -> dict:
    """Start gunicorn, click for ``seconds`` with ``clients`` threads (killing a worker ``kill_after`` seconds
    in, when given), stop; returns the figures.

    The server's temporary folder (its model dir and stderr log) is removed before returning or raising.

    Raises:
        ServerNotHealthy: the server did not answer ``/health`` within ``health_timeout_s`` seconds or
            exited first; the message ends with the last lines of gunicorn's stderr.
    """
    clicks, labels = _clicks()
    config = _config(labels)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="load-benchmark-"))
    try:
        model_dir = tmp / "models"
        model_dir.mkdir()
        stderr_log = tmp / "gunicorn-stderr.log"
        env = dict(os.environ, MODEL_DIR=str(model_dir), LOCAL_FILES_ROOTS=str(coco_mini_dir().resolve()),
                   LOG_LEVEL="ERROR", OMP_NUM_THREADS="1")
        gunicorn = Path(sys.executable).parent / "gunicorn"
        cmd = [str(gunicorn), "sim_backend.wsgi:app", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
               "--threads", str(threads), "--timeout", "300", "--no-control-socket"]
        with open(stderr_log, "wb") as errf:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errf)
        try:
            try:
                wait_healthy(base, proc, health_timeout_s)
            except ServerNotHealthy as e:
                _stop(proc)
                tail = _tail(stderr_log)
                raise ServerNotHealthy(f"{e}; command: {' '.join(cmd)}"
                                       + (f"\ngunicorn's stderr ends with:\n{tail}" if tail else "")) from None
            warm = _payload(clicks[0], config, 0)
            for _ in range(workers * 2):  # every worker imports its engine before the clock starts
                urllib.request.urlopen(urllib.request.Request(base + "/predict", data=warm, headers={
                    "Content-Type": "application/json"}), timeout=120)
            pids = _children(proc.pid)
            rss_start = {p: _rss_mb(p) for p in pids}
            latencies, errors, lock = [], [], threading.Lock()
            stop_at = time.monotonic() + seconds
            count = [0]

            def client(seed: int) -> None:
                rng = random.Random(seed)
                while time.monotonic() < stop_at:
                    with lock:
                        if max_requests is not None and count[0] >= max_requests:
                            return
                        count[0] += 1
                        n = count[0]
                    body = _payload(rng.choice(clicks), config, n)
                    t0 = time.monotonic()
                    try:
                        req = urllib.request.Request(base + "/predict", data=body,
                                                     headers={"Content-Type": "application/json"})
                        with urllib.request.urlopen(req, timeout=60) as r:
                            answer = json.loads(r.read())
                        ok = r.status == 200 and not answer.get("errors")
                        why = None if ok else f"HTTP {r.status}: {answer.get('errors')}"
                    except Exception as e:  # a refused or dropped connection counts as an error
                        ok, why = False, f"{e.__class__.__name__}: {e}"
                    dt = time.monotonic() - t0
                    with lock:
                        (latencies.append(dt) if ok else errors.append((time.monotonic(), why)))

            t_start = time.monotonic()
            pool = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in pool:
                t.start()
            replaced_s, t_kill = None, float("inf")
            if kill_after is not None:
                time.sleep(kill_after)
                victim = pids[0]
                os.kill(victim, signal.SIGKILL)
                t_kill = time.monotonic()
                while time.monotonic() - t_kill < 30:
                    now = set(_children(proc.pid)) - {victim}
                    if len(now) >= workers:
                        replaced_s = time.monotonic() - t_kill
                        break
                    time.sleep(0.02)
            for t in pool:
                t.join()
            wall = time.monotonic() - t_start
            rss_end = {p: _rss_mb(p) for p in pids if os.path.exists(f"/proc/{p}")}
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else float("nan")

    growth = max((rss_end[p] - rss_start[p] for p in rss_end), default=float("nan"))
    return {"clients": clients, "seconds": round(wall, 1), "workers": workers, "threads": threads,
            "requests": len(lat) + len(errors), "errors": len(errors), "first_errors": [w for _, w in errors[:3]],
            "throughput_rps": len(lat) / wall if wall else 0.0, "p50_s": pct(0.50), "p95_s": pct(0.95),
            "p99_s": pct(0.99), "mean_s": statistics.fmean(lat) if lat else float("nan"),
            "worker_rss_start_mb": [round(v) for v in rss_start.values()],
            "worker_rss_end_mb": [round(v) for v in rss_end.values()], "worker_rss_growth_mb": growth,
            "engine": "grabcut-v1", **({"killed_worker_after_s": kill_after, "replaced_in_s": replaced_s,
                                        "errors_later_than_2s_after_the_kill": sum(t > t_kill + 2 for t, _ in errors)}
                                       if kill_after is not None else {})}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status: 0, 1 when a target is missed, 2 when the server
    never became healthy (the reason goes to stderr; nothing is recorded)."""
    p = argparse.ArgumentParser(prog="python -m sim_backend.load_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many requests in all")
    p.add_argument("--kill-worker-after", type=float, default=None, help="SIGKILL a worker this many seconds in")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.*")
    p.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT_S,
                   help="seconds the server gets to answer /health after its start (default %(default)g)")
    args = p.parse_args(argv)
    machine = machine_description()
    try:
        fig = run(args.clients, args.seconds, args.workers, args.threads, args.max_requests, args.kill_worker_after,
                  args.health_timeout)
    except ServerNotHealthy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(fig, indent=2))
    errors = fig["errors_later_than_2s_after_the_kill"] if args.kill_worker_after is not None else fig["errors"]
    met = errors == 0 and fig["p95_s"] <= 1.5 and fig["worker_rss_growth_mb"] <= 300
    print(f"targets (0 errors{' after the kill' if args.kill_worker_after is not None else ''}, p95 <= 1.5 s, "
          f"RSS growth <= 300 MB): {'met' if met else 'MISSED'}")
    if not args.no_write:
        argv_text = " ".join(argv if argv is not None else sys.argv[1:])
        kill = f"-kill{args.kill_worker_after:g}s" if args.kill_worker_after is not None else ""
        record_results(TABLE, f"grabcut-{args.clients}clients-{args.workers}w{args.threads}t{kill}",
                       {k: v for k, v in fig.items() if k != "first_errors"},
                       f"python -m sim_backend.load_benchmark {argv_text}".strip(), machine=machine)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
