"""Run a real Label Studio and our ML backend for end-to-end tests.

Label Studio 1.23.2 lives in its own virtual environment, installed by
``scripts/install_label_studio.sh`` (its pins clash with torch and numpy). That script also keeps a
migrated, empty sqlite database; every server started here begins from a copy of it (ready in 4-8 s instead
of 35-85 s of migrations). Both live under ``${SIM_CACHE_DIR:-~/.cache/sim-prelabels}``.

API (everything takes/returns plain ids and dicts; the SDK client is ``label_studio_sdk.LabelStudio``):

Locating the install
    ``ls_venv_dir() -> Path``, ``ls_template_db() -> Path``,
    ``label_studio_missing() -> str | None`` (why Label Studio cannot be started, or None),
    ``cache_dir() -> Path``, ``free_port() -> int``.
    Pytest fixtures over this module are in ``tests/e2e/conftest.py`` (``label_studio``, ``ls_client``,
    ``start_backend``, ``coco_val``, ``coco_train``).

Servers (context managers; ``start()`` waits until ready, ``stop()`` ends the process group it started)
    ``LabelStudioServer(workdir, document_root, *, port=None, username=..., password=..., legacy_token=None,
    extra_env=None)`` -> ``.url``, ``.api_key`` (a Personal Access Token it created, as on a stock install;
    the legacy token when ``legacy_token`` is given), ``.client()`` (SDK client), ``.session()`` (requests
    session with the key's header), ``.log_path``. Headless under ``env -i`` with the environment Label
    Studio 1.23 needs for these tests (legacy API token on, Local Files serving under ``document_root``,
    ``ML_BLOCK_LOCAL_IP=false`` and ``SSRF_PROTECTION_ENABLED=false`` so that a 127.0.0.1 backend and its
    webhook are accepted, no analytics) and longer ML timeouts for 2 shared cores.
    ``BackendServer(workdir, *, label_studio_url, api_key, model_dir, port=None, workers=2, threads=2,
    basic_auth=None, extra_env=None)`` -> ``.url``, ``.log_path``: ``.venv/bin/gunicorn sim_backend.wsgi:app`` on a free
    127.0.0.1 port with LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and MODEL_DIR.

Project set-up
    ``labeling_config(labels, *, brush=True) -> str``: Image ``image`` ($image) + RectangleLabels ``box``
    + PolygonLabels ``polygon`` (+ BrushLabels ``brush``) over the same labels.
    ``create_project(client, title, label_config) -> int``.
    ``add_local_files_storage(client, project_id, path, *, regex_filter=r".*\\.(jpe?g|png)$") -> int``:
    a Local Files import storage over ``path`` (inside the document root), synced; one task per image.
    ``list_tasks(client, project_id) -> list[dict]``, ``task_image_url(task) -> str``,
    ``task_file_name(task) -> str``: the image file name of a task (from its ``/data/local-files/?d=``).
    ``coco_box_results(coco, image_id, *, from_name="box", to_name="image") -> list[dict]``: the image's
    non-crowd COCO boxes as ``rectanglelabels`` results (percent, with original_width/height).
    ``create_gt_box_annotations(client, project_id, coco) -> dict[int, int]`` (task id -> COCO image id).

ML backend
    ``connect_ml_backend(client, project_id, url, *, title=..., interactive=True, basic_auth=None) -> int``
    (creates it, then ``PATCH /api/ml/{id}`` with url and project, as Label Studio's UI does).
    ``ml_backend_model_version(client, ml_id) -> str``.
    ``retrieve_predictions(client, project_id, task_ids, *, chunk=10)``: the Data Manager action
    ``retrieve_tasks_predictions`` ("Retrieve predictions") on those tasks, synchronously.
    ``interactive_predict(server, ml_id, task_id, context) -> dict``: Label Studio's own interactive
    API ``POST /api/ml/{id}/interactive-annotating`` (what the labeling UI calls while a user draws);
    returns its JSON ({"data": {result, score, model_version}} or {"errors": [...]}).
    ``list_predictions(client, project_id) -> list[dict]``, ``count_annotations(client, project_id) -> int``.

Decoding
    ``region_mask(region) -> np.ndarray`` (H, W) bool from one polygonlabels/brushlabels result item,
    ``regions_by_type(results, type_) -> list[dict]``; polygons are rasterised with
    ``sim_backend.regions.polygons_to_mask``, brushes with ``sim_backend.regions.brush_rle_to_mask``.

Errors: :class:`HarnessError` (server did not start, API call failed) with the tail of the server log.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.sax.saxutils
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import requests

from sim_backend.label_studio import LabelStudioConnection

LS_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_USERNAME = "e2e@example.com"
DEFAULT_PASSWORD = "e2e-password-123"
DEFAULT_LEGACY_TOKEN = "e2e0123456789abcdef0123456789abcdef0123"  # <= 40 chars (Token.key max length)


class HarnessError(RuntimeError):
    """A server did not start or stop, or a Label Studio API call did not do what it should."""


# ----------------------------------------------------------------------------------------- install
def cache_dir() -> Path:
    """Cache root shared with ``scripts/install_label_studio.sh`` (``$SIM_CACHE_DIR``)."""
    return Path(os.environ.get("SIM_CACHE_DIR") or Path.home() / ".cache" / "sim-prelabels")


def ls_venv_dir() -> Path:
    """Label Studio's venv (``$LABEL_STUDIO_VENV`` or ``<cache>/label-studio-venv``)."""
    return Path(os.environ.get("LABEL_STUDIO_VENV") or cache_dir() / "label-studio-venv")


def ls_template_db() -> Path:
    """The migrated empty sqlite database made by the install script."""
    return cache_dir() / "label-studio-template" / "label_studio.sqlite3"


def label_studio_missing() -> str | None:
    """Return why Label Studio cannot be started here (a message naming the fix), or None if it can."""
    exe = ls_venv_dir() / "bin" / "label-studio"
    if not exe.exists():
        return f"Label Studio is not installed ({exe} missing): run scripts/install_label_studio.sh"
    if not list(ls_venv_dir().glob(f"lib/python*/site-packages/label_studio-{LS_VERSION}.dist-info")):
        return (f"{ls_venv_dir()} does not hold label-studio {LS_VERSION}: "
                "run scripts/install_label_studio.sh")
    stamp = ls_template_db().parent / "VERSION"
    if not (ls_template_db().exists() and stamp.exists() and stamp.read_text().strip() == LS_VERSION):
        return (f"no migrated Label Studio {LS_VERSION} database at {ls_template_db()}: "
                "run scripts/install_label_studio.sh")
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (Linux), so that a killed
    pytest leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class _Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def spawn(self, argv: Sequence[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(list(argv), env=env, cwd=str(cwd), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        atexit.register(self.stop)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, probe, timeout: float) -> None:
        """Poll ``probe()`` (truthy when ready) until ``timeout`` seconds; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise HarnessError(f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                                   f"log {self.log_path}:\n{_tail(self.log_path)}")
            try:
                if probe():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise HarnessError(f"{self.name} not ready after {timeout:.0f} s; log {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the process group started here, SIGKILL it after ``grace`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


# ----------------------------------------------------------------------------------- Label Studio
class LabelStudioServer:
    """A headless Label Studio on 127.0.0.1, its data in ``workdir``, started from the migrated template.

    By default it is a stock install: the organisation has legacy tokens OFF, and the harness, as a user
    would, logs in with the user's password and creates a Personal Access Token (``POST /api/token/``),
    which becomes ``self.api_key``. ``legacy_token`` starts it with legacy tokens ON and that token as
    ``self.api_key`` instead.

    Args:
        workdir: empty or new folder for its data dir, home and log.
        document_root: folder served by ``/data/local-files/?d=<path relative to it>``; Local Files
            storages must point inside it.
        port: TCP port (default: a free one).
        username, password: the user created at start.
        legacy_token: a legacy API token to enable (``Authorization: Token <token>``); None = stock.
        extra_env: more environment variables for Label Studio (override the defaults below).
    """

    def __init__(self, workdir: Path, document_root: Path, *, port: int | None = None,
                 username: str = DEFAULT_USERNAME, password: str = DEFAULT_PASSWORD,
                 legacy_token: str | None = None, extra_env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.document_root = Path(document_root).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.username, self.password = username, password
        self.legacy_token = legacy_token
        self.api_key = legacy_token or ""  # the PAT once started (stock)
        self.extra_env = dict(extra_env or {})
        self.log_path = self.workdir / "label-studio.log"
        self._proc = _Process("Label Studio", self.log_path)

    def env(self) -> dict[str, str]:
        """The complete environment Label Studio runs with (``env -i``: nothing inherited)."""
        venv = ls_venv_dir()
        env = {
            "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workdir / "home"),
            "LANG": "C.UTF-8",
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.workdir / "data"),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "ML_BLOCK_LOCAL_IP": "false",
            # 1.23.2 also validates the ML backend's webhook URL (created with the backend, and used for
            # START_TRAINING / ANNOTATION_* events) against 127.0.0.0/8 unless SSRF protection is off.
            "SSRF_PROTECTION_ENABLED": "false",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            # 2 shared cores: Label Studio's defaults (setup 3 s, health 1 s, predict 100 s) are for an
            # idle machine; the protocol's own limits are tested against the backend directly.
            "ML_TIMEOUT_SETUP": "30",
            "ML_TIMEOUT_HEALTH": "15",
            "ML_CONNECTION_TIMEOUT": "10",
            "ML_TIMEOUT_PREDICT": "900",
            "LOG_LEVEL": "INFO",
        }
        if self.legacy_token:
            env.update({"LABEL_STUDIO_USER_TOKEN": self.legacy_token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"})
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 240.0) -> "LabelStudioServer":
        """Copy the migrated database, start ``label-studio start`` and wait until the API answers.

        Raises:
            HarnessError: Label Studio missing, exited, or not ready within ``timeout`` seconds.
        """
        missing = label_studio_missing()
        if missing:
            raise HarnessError(missing)
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        self.document_root.mkdir(parents=True, exist_ok=True)
        db = data / "label_studio.sqlite3"
        if not db.exists():
            shutil.copyfile(ls_template_db(), db)
        argv = ["/usr/bin/env", "-i", *[f"{k}={v}" for k, v in self.env().items()],
                str(ls_venv_dir() / "bin" / "label-studio"), "start", "--no-browser",
                "--internal-host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data),
                "--username", self.username, "--password", self.password]
        if self.legacy_token:
            argv += ["--user-token", self.legacy_token, "--enable-legacy-api-token"]
        self._proc.spawn(argv, env={}, cwd=self.workdir)
        self._proc.wait_ready(lambda: requests.get(f"{self.url}/health", timeout=5).status_code == 200, timeout)
        if not self.legacy_token:
            self.api_key = self.create_personal_access_token()
        if self.session().get(f"{self.url}/api/current-user/whoami", timeout=30).status_code != 200:
            raise HarnessError(f"Label Studio refused its own key; log {self.log_path}:\n{_tail(self.log_path)}")
        return self

    def login(self) -> requests.Session:
        """A browser-like session logged in with the user's e-mail and password (Django's login form)."""
        s = requests.Session()
        s.get(f"{self.url}/user/login/", timeout=30)
        r = s.post(f"{self.url}/user/login/", timeout=30, headers={"Referer": f"{self.url}/user/login/"},
                   data={"email": self.username, "password": self.password,
                         "csrfmiddlewaretoken": s.cookies.get("csrftoken", "")})
        if r.status_code != 200 or "sessionid" not in s.cookies:
            raise HarnessError(f"login to Label Studio failed: HTTP {r.status_code}")
        return s

    def create_personal_access_token(self) -> str:
        """What a user does in Account & Settings → Personal Access Token: ``POST /api/token/`` while logged in.

        Raises:
            HarnessError: Label Studio refused, or its organisation still has legacy tokens on.
        """
        s = self.login()
        settings = s.get(f"{self.url}/api/jwt/settings", timeout=30).json()
        if settings.get("legacy_api_tokens_enabled") or not settings.get("api_tokens_enabled"):
            raise HarnessError(f"not a stock Label Studio: its token settings are {settings}")
        r = s.post(f"{self.url}/api/token/", timeout=30,
                   headers={"X-CSRFToken": s.cookies.get("csrftoken", ""), "Referer": self.url})
        if r.status_code != 201:
            raise HarnessError(f"creating a Personal Access Token failed: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["token"]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL, to the process group started here)."""
        self._proc.stop()

    def alive(self) -> bool:
        return self._proc.alive()

    def session(self) -> requests.Session:
        """A ``requests`` session that sends the API key the way the SDK does (``Token`` for a legacy token,
        ``Bearer`` with an access token exchanged for the PAT, valid for a few minutes)."""
        s = requests.Session()
        s.headers.update(LabelStudioConnection(self.url, self.api_key).auth_headers())
        return s

    def client(self):
        """A label-studio-sdk 2.x client (``LabelStudio(base_url=..., api_key=...)``)."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.api_key, timeout=900)

    def tail_log(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    def __enter__(self) -> "LabelStudioServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------ our backend
class BackendServer:
    """Our ML backend under gunicorn (``.venv/bin/gunicorn sim_backend.wsgi:app``) on 127.0.0.1.

    Args:
        workdir: folder for its log.
        label_studio_url, api_key: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY of the backend.
        model_dir: MODEL_DIR (model registry root).
        port: TCP port (default: a free one).
        workers, threads: gunicorn ``-w`` and ``--threads`` (2 workers: /predict may reach a process
            that never saw /setup, as in production).
        basic_auth: (user, password) the backend requires (BASIC_AUTH_USER / BASIC_AUTH_PASS), or None.
        extra_env: more environment variables for the backend.
    """

    def __init__(self, workdir: Path, *, label_studio_url: str, api_key: str, model_dir: Path,
                 port: int | None = None, workers: int = 2, threads: int = 2,
                 basic_auth: tuple[str, str] | None = None, extra_env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.label_studio_url, self.api_key, self.model_dir = label_studio_url, api_key, Path(model_dir)
        self.workers, self.threads = workers, threads
        self.auth = basic_auth
        self.extra_env = dict(extra_env or {})
        self.log_path = self.workdir / "backend.log"
        self._proc = _Process("sim_backend (gunicorn)", self.log_path)

    def gunicorn(self) -> Path:
        """The gunicorn of the interpreter running the tests (the project's .venv)."""
        exe = Path(sys.executable).parent / "gunicorn"
        return exe if exe.exists() else REPO_ROOT / ".venv" / "bin" / "gunicorn"

    def env(self) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", str(self.workdir)),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO_ROOT),
            "LABEL_STUDIO_URL": self.label_studio_url,
            "LABEL_STUDIO_API_KEY": self.api_key,
            "MODEL_DIR": str(self.model_dir),
        }
        if self.auth:
            env.update({"BASIC_AUTH_USER": self.auth[0], "BASIC_AUTH_PASS": self.auth[1]})
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 180.0) -> "BackendServer":
        """Start gunicorn and wait until ``GET /health`` answers 200.

        Raises:
            HarnessError: gunicorn exited or did not answer within ``timeout`` seconds.
        """
        self.model_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(self.gunicorn()), "sim_backend.wsgi:app", "--bind", f"127.0.0.1:{self.port}",
                "--workers", str(self.workers), "--threads", str(self.threads), "--timeout", "900",
                "--graceful-timeout", "10", *self._control_socket_args()]
        self._proc.spawn(argv, env=self.env(), cwd=REPO_ROOT)
        self._proc.wait_ready(lambda: requests.get(f"{self.url}/health", timeout=5).status_code == 200, timeout)
        return self

    def _control_socket_args(self) -> list[str]:
        """gunicorn >= 24 opens a control socket at ~/.gunicorn/gunicorn.ctl, shared by every gunicorn
        of the user: give this one its own (or none on an older gunicorn that lacks the option)."""
        try:
            help_text = subprocess.run([str(self.gunicorn()), "--help"], capture_output=True, text=True,
                                       timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return ["--no-control-socket"] if "--no-control-socket" in help_text else []

    def stop(self) -> None:
        self._proc.stop()

    def alive(self) -> bool:
        return self._proc.alive()

    def tail_log(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    def __enter__(self) -> "BackendServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------- project set-up
def select_images(coco: dict, n: int) -> list[dict]:
    """The ``n`` images of a COCO json with the fewest ground-truth boxes (at least one, no crowd region), by id.

    Few boxes per image keep the engines' time inside the test budget.

    Raises:
        HarnessError: the json has fewer than ``n`` such images.
    """
    from collections import Counter

    boxes = Counter(a["image_id"] for a in coco["annotations"] if not a.get("iscrowd", 0))
    crowd = {a["image_id"] for a in coco["annotations"] if a.get("iscrowd", 0)}
    imgs = [i for i in coco["images"] if boxes[i["id"]] > 0 and i["id"] not in crowd]
    imgs.sort(key=lambda i: (boxes[i["id"]], i["id"]))
    if len(imgs) < n:
        raise HarnessError(f"the COCO json has only {len(imgs)} usable images, the test needs {n}")
    return imgs[:n]


def stage_images(images: Iterable[dict], image_dir: Path, folder: Path) -> Path:
    """Copy the COCO ``images``' files from ``image_dir`` into ``folder`` (under a Local Files document root)."""
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        shutil.copyfile(image_dir / im["file_name"], folder / im["file_name"])
    return folder


def labeling_config(labels: Iterable[str], *, brush: bool = True) -> str:
    """Labeling config: Image ``image`` (``$image``), RectangleLabels ``box``, PolygonLabels ``polygon``
    and, if ``brush``, BrushLabels ``brush``, all over ``labels`` (e.g. coco-mini's category names)."""
    labels = list(labels)
    if not labels:
        raise ValueError("labeling_config needs at least one label")
    items = "\n".join(f'    <Label value={xml.sax.saxutils.quoteattr(str(l))}/>' for l in labels)
    blocks = [f'  <RectangleLabels name="box" toName="image">\n{items}\n  </RectangleLabels>',
              f'  <PolygonLabels name="polygon" toName="image">\n{items}\n  </PolygonLabels>']
    if brush:
        blocks.append(f'  <BrushLabels name="brush" toName="image">\n{items}\n  </BrushLabels>')
    return '<View>\n  <Image name="image" value="$image" zoom="true"/>\n' + "\n".join(blocks) + "\n</View>"


def create_project(client, title: str, label_config: str) -> int:
    """Create a project and return its id."""
    return client.projects.create(title=title, label_config=label_config).id


def add_local_files_storage(client, project_id: int, path: Path, *,
                            regex_filter: str = r".*\.(jpe?g|JPE?G|png|PNG)$") -> int:
    """Add a Local Files import storage over ``path`` (inside the document root) and sync it.

    Each matching file becomes a task whose image is ``/data/local-files/?d=<path relative to the
    document root>`` (blob URLs). Returns the storage id.

    Raises:
        HarnessError: the sync created no task.
    """
    st = client.import_storage.local.create(project=project_id, path=str(Path(path).resolve()),
                                            regex_filter=regex_filter, use_blob_urls=True,
                                            recursive_scan=True, title="coco-mini images")
    client.import_storage.local.sync(id=st.id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # sync runs inline without Redis; poll in case it is queued
        got = client.import_storage.local.get(id=st.id)
        if str(getattr(got, "status", "")).lower().endswith(("completed", "failed")):
            break
        time.sleep(0.5)
    if getattr(got, "status", None) and str(got.status).lower().endswith("failed"):
        raise HarnessError(f"Local Files storage sync failed: {got.traceback or got.meta}")
    if not list_tasks(client, project_id):
        raise HarnessError(f"Local Files storage over {path} created no task (status {got.status})")
    return st.id


def list_tasks(client, project_id: int) -> list[dict]:
    """All tasks of a project as dicts (id, data, ...)."""
    return [t if isinstance(t, dict) else t.model_dump() for t in
            client.tasks.list(project=project_id, fields="all")]


def task_image_url(task: dict) -> str:
    """The image URL of a task (``data.image``, or ``data["$undefined$"]`` of a blob import)."""
    data = task["data"]
    url = data.get("image") or data.get("$undefined$")
    if not url:
        raise HarnessError(f"task {task.get('id')} has no image in its data: {data}")
    return url


def task_file_name(task: dict) -> str:
    """The image file name of a task imported from Local Files (``/data/local-files/?d=dir/name.jpg``)."""
    url = task_image_url(task)
    q = parse_qs(urlparse(url).query)
    path = unquote(q["d"][0]) if "d" in q else urlparse(url).path
    return Path(path).name


def coco_box_results(coco: dict, image_id: int, *, from_name: str = "box",
                     to_name: str = "image") -> list[dict]:
    """The non-crowd COCO boxes of one image as Label Studio ``rectanglelabels`` results.

    COCO ``bbox`` is [x, y, w, h] in pixels; Label Studio wants x, y, width, height in percent of the
    image plus ``original_width``/``original_height`` in pixels. Each result's id is ``gt<ann id>``.
    """
    img = next(i for i in coco["images"] if i["id"] == image_id)
    w, h = img["width"], img["height"]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out = []
    for a in coco["annotations"]:
        if a["image_id"] != image_id or a.get("iscrowd", 0):
            continue
        x, y, bw, bh = a["bbox"]
        out.append({
            "id": f"gt{a['id']}", "type": "rectanglelabels", "from_name": from_name, "to_name": to_name,
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": 100.0 * x / w, "y": 100.0 * y / h, "width": 100.0 * bw / w,
                      "height": 100.0 * bh / h, "rotation": 0, "rectanglelabels": [names[a["category_id"]]]},
        })
    return out


def create_gt_box_annotations(client, project_id: int, coco: dict) -> dict[int, int]:
    """Annotate every task whose image file is in ``coco`` with that image's ground-truth boxes.

    Returns:
        {task id: COCO image id} for the tasks annotated.
    """
    by_name = {i["file_name"]: i["id"] for i in coco["images"]}
    out = {}
    for task in list_tasks(client, project_id):
        image_id = by_name.get(task_file_name(task))
        if image_id is None:
            continue
        client.annotations.create(id=task["id"], result=coco_box_results(coco, image_id))
        out[task["id"]] = image_id
    return out


# ------------------------------------------------------------------------------------- ML backend
def connect_ml_backend(client, project_id: int, url: str, *, title: str = "sim-prelabels",
                       interactive: bool = True, basic_auth: tuple[str, str] | None = None) -> int:
    """Add our backend to a project (Label Studio calls its /health and /setup) and return its id.

    ``basic_auth`` fills the "Connect model" form's basic-auth fields (Label Studio then sends them with
    every request it makes to the backend). Then ``PATCH /api/ml/{id}`` with both url and project, as the
    settings page does when saved.
    """
    auth = ({"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
            if basic_auth else {})
    ml = client.ml.create(url=url, project=project_id, title=title, is_interactive=interactive, **auth)
    client.ml.update(id=ml.id, url=url, project=project_id, title=title, is_interactive=interactive, **auth)
    return ml.id


def ml_backend_model_version(client, ml_id: int) -> str:
    """The model_version Label Studio recorded from the backend's last /setup."""
    return client.ml.get(id=ml_id).model_version or ""


def retrieve_predictions(client, project_id: int, task_ids: Sequence[int], *, chunk: int = 10) -> None:
    """Run the Data Manager action "Retrieve predictions" (``retrieve_tasks_predictions``) on tasks.

    Label Studio sends each chunk of tasks to the backend's /predict in one request and stores the
    results as predictions, skipping tasks that already have a prediction of the current model_version.
    """
    ids = list(task_ids)
    for i in range(0, len(ids), chunk):
        client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                              selected_items={"all": False, "included": ids[i:i + chunk]},
                              request_options={"timeout_in_seconds": 900})


def interactive_predict(server: LabelStudioServer, ml_id: int, task_id: int, context: dict,
                        timeout: float = 300.0) -> dict:
    """Label Studio's interactive pre-annotation API, as the labeling UI calls it after a user draws.

    ``POST /api/ml/{ml_id}/interactive-annotating`` {"task": id, "context": context}; Label Studio
    forwards the task and context to the backend's /predict and answers ``{"data": {...}}`` with the
    backend's result for the task, or ``{"errors": [...]}``. Nothing is stored.
    """
    r = server.session().post(f"{server.url}/api/ml/{ml_id}/interactive-annotating",
                              json={"task": task_id, "context": context}, timeout=timeout)
    if r.status_code != 200:
        raise HarnessError(f"interactive-annotating answered {r.status_code}: {r.text[:500]}")
    return r.json()


def list_predictions(client, project_id: int) -> list[dict]:
    """All predictions stored for a project's tasks (dicts with task, result, score, model_version)."""
    return [p.model_dump() if hasattr(p, "model_dump") else dict(p)
            for p in client.predictions.list(project=project_id)]


def count_annotations(client, project_id: int) -> int:
    """Number of annotations in the project (summed over tasks)."""
    return sum(len(client.annotations.list(id=t["id"])) for t in list_tasks(client, project_id))


# ---------------------------------------------------------------------------------------- decoding
def regions_by_type(results: Iterable[dict], type_: str) -> list[dict]:
    """The result items of one ``type`` ("polygonlabels", "brushlabels", "rectanglelabels")."""
    return [r for r in results if r.get("type") == type_]


def region_mask(region: dict) -> np.ndarray:
    """Decode one stored polygonlabels or brushlabels result item into an (H, W) bool mask.

    H, W are the region's ``original_height``/``original_width`` in pixels. Polygons (points in percent)
    go through ``sim_backend.regions.polygons_to_mask``, brush RLE through ``brush_rle_to_mask``.

    Raises:
        HarnessError: another region type, or no original size.
    """
    from sim_backend.regions import brush_rle_to_mask, polygons_to_mask

    w, h = region.get("original_width"), region.get("original_height")
    if not w or not h:
        raise HarnessError(f"region without original_width/height: {json.dumps(region)[:300]}")
    if region.get("type") == "polygonlabels":
        return polygons_to_mask([region["value"]["points"]], int(w), int(h))
    if region.get("type") == "brushlabels":
        return np.asarray(brush_rle_to_mask(region["value"]["rle"], int(w), int(h))).astype(bool)
    raise HarnessError(f"cannot decode a {region.get('type')!r} region into a mask")
