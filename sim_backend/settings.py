"""The product's settings, read once from the environment: the only place that reads it.

Every limit of the server is an environment variable with a default fit for a team's network
(:class:`Settings`); the training commands import :class:`Settings` to reach Label Studio and the model
directory. A variable that does not parse raises :class:`SettingsError` naming it.
"""
from __future__ import annotations

import ipaddress
import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

MIB = 1 << 20


class SettingsError(ValueError):
    """Raised when an environment variable holds a value of the wrong type or range."""


def _bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("is not a boolean (use true/false, 1/0, yes/no)")


def _number(kind: type, minimum: float, exclusive: bool = False, maximum: float | None = None) -> Callable:
    def parse(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"is not a{'n integer' if kind is int else ' number'}") from None
        if value < minimum or (exclusive and value == minimum):
            raise ValueError(f"must be {'>' if exclusive else '>='} {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}")
        return value
    return parse


def _log_level(raw: str) -> str:
    if raw.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return raw.upper()


def _args(raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as e:
        raise ValueError(f"does not split into arguments: {e}") from None


def _paths(raw: str) -> tuple[Path, ...]:
    roots = tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip())
    missing = [str(p) for p in roots if not p.is_dir()]
    if missing:
        raise ValueError(f"names folders that do not exist: {missing}")
    return roots


def _hosts(raw: str) -> tuple[str, ...]:
    out = []
    for h in (x.strip().lower() for x in raw.split(",")):
        if not h:
            continue
        if "/" in h:
            ipaddress.ip_network(h, strict=False)  # a CIDR: raises ValueError when malformed
        out.append(h)
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    """Configuration of the ML backend and the training commands.

    Attributes (environment variable and default in brackets):
        label_studio_url: base URL of Label Studio, e.g. ``http://localhost:8080`` [LABEL_STUDIO_URL];
            images of ``/data/upload/…`` and ``/data/local-files/?d=…`` are fetched from it.
        label_studio_api_key: a Personal Access Token (Label Studio ≥ 1.20's default) or a legacy token
            [LABEL_STUDIO_API_KEY]; sent to Label Studio's host only (:mod:`sim_backend.label_studio`).
        model_dir: root of the model registry (:class:`sim_model.registry.ModelRegistry`) [MODEL_DIR, ./models].
        device: torch device of served model versions [DEVICE, cpu; "cuda" on a GPU machine].
        basic_auth_user, basic_auth_pass: HTTP basic auth that every endpoint but ``/health`` requires
            [BASIC_AUTH_USER, BASIC_AUTH_PASS; both or neither; unset = no auth].
        polygon_tolerance_px: polygon simplification, the ``epsilon`` of ``cv2.approxPolyDP`` in pixels
            [POLYGON_TOLERANCE_PX, 1.0]; a /predict request may override it (``params.polygon_tolerance_px``).
        mask_threshold: mask probability counted as foreground [MASK_THRESHOLD, 0.5].
        min_region_px: mask parts smaller than this many pixels are dropped, except a mask's largest
            [MIN_REGION_PX, 16].
        output_brush: also answer brushlabels regions when the config has BrushLabels [OUTPUT_BRUSH, true].
        log_level: Python logging level [LOG_LEVEL, INFO].
        max_request_bytes: largest request body; larger → HTTP 413, by the Content-Length or, for a chunked
            body, as soon as the read reaches the limit [MAX_REQUEST_BYTES, 20 MiB].
        max_json_depth: deepest nesting of a request's JSON (``{"a": [1]}`` is 2; Label Studio's payloads
            stay under 12); deeper → HTTP 400 [MAX_JSON_DEPTH, 64].
        max_tasks_per_request: more tasks in one /predict → HTTP 400 [MAX_TASKS_PER_REQUEST, 1000].
        max_boxes_per_task: more boxes in one task → that task's error [MAX_BOXES_PER_TASK, 1000].
        request_deadline_s: a /predict answers within this many seconds: tasks not started by then get a
            "deadline exceeded" error [REQUEST_DEADLINE_S, 90; Label Studio waits ML_TIMEOUT_PREDICT = 100].
        max_image_pixels: larger images (width × height) are refused before decoding; Pillow's own bomb limit
            follows it [MAX_IMAGE_PIXELS, 50e6]. Decoding costs about 8 bytes per pixel at its peak (400 MB
            at 50 M pixels; ``python -m sim_backend.decode_benchmark``), one image at a time per request.
        max_image_bytes: larger image files or downloads are refused (Content-Length, then a capped
            streamed read) [MAX_IMAGE_BYTES, 64 MiB].
        image_fetch_timeout_s: connect/read timeout of one network operation [IMAGE_FETCH_TIMEOUT_S, 10].
        image_fetch_deadline_s: total time of one image fetch, redirects and every read included
            [IMAGE_FETCH_DEADLINE_S, 30].
        image_cache_bytes: decoded images kept per worker, keyed by their canonical location
            [IMAGE_CACHE_BYTES, 256 MiB; 0 = no cache].
        local_files_roots: folders whose files may be read as task images, like Label Studio's
            LOCAL_FILES_DOCUMENT_ROOT [LOCAL_FILES_ROOTS, os.pathsep-separated; none by default: no local file].
        image_hosts_allowed: hosts (names, IPs or CIDRs) that images may come from although they resolve to
            private, loopback or link-local addresses [IMAGE_HOSTS_ALLOWED, comma-separated; none].
        max_concurrent_retrains: retrains running at once across projects; the webhook answers "busy"
            beyond [MAX_CONCURRENT_RETRAINS, 1].
        retrain_every_n: start a retrain after every N new annotations of a project, 0 = off
            [RETRAIN_EVERY_N_ANNOTATIONS, 0].
        retrain_args: extra arguments of the retrains the webhook starts, split like a shell would
            [RETRAIN_ARGS, e.g. ``"--max-iter 500 --tolerance 0.01"``].
    """

    label_studio_url: str = ""
    label_studio_api_key: str = ""
    model_dir: Path = field(default_factory=lambda: Path("./models"))
    device: str = "cpu"
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    polygon_tolerance_px: float = 1.0
    mask_threshold: float = 0.5
    min_region_px: int = 16
    output_brush: bool = True
    log_level: str = "INFO"
    max_request_bytes: int = 20 * MIB
    max_json_depth: int = 64
    max_tasks_per_request: int = 1000
    max_boxes_per_task: int = 1000
    request_deadline_s: float = 90.0
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 64 * MIB
    image_fetch_timeout_s: float = 10.0
    image_fetch_deadline_s: float = 30.0
    image_cache_bytes: int = 256 * MIB
    local_files_roots: tuple[Path, ...] = ()
    image_hosts_allowed: tuple[str, ...] = ()
    max_concurrent_retrains: int = 1
    retrain_every_n: int = 0
    retrain_args: tuple[str, ...] = ()

    @property
    def basic_auth(self) -> bool:
        """Whether the backend requires HTTP basic auth."""
        return bool(self.basic_auth_user)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from environment variables (unset or empty ones keep their defaults).

        Args:
            environ: mapping to read instead of ``os.environ`` (tests).

        Raises:
            SettingsError: a variable that does not parse or is out of range, naming the variable; one of
                BASIC_AUTH_USER / BASIC_AUTH_PASS without the other.
        """
        env = os.environ if environ is None else environ
        kw: dict = {}
        for name, (var, parse) in _ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                kw[name] = parse(raw.strip())
            except ValueError as e:
                raise SettingsError(f"{var}={raw[:200]!r} {e}") from None
        settings = replace(cls(), **kw)
        if bool(settings.basic_auth_user) != bool(settings.basic_auth_pass):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        return settings


#: field → (environment variable, parser of the stripped value; raises ValueError with the reason).
_ENV: dict[str, tuple[str, Callable]] = {
    "label_studio_url": ("LABEL_STUDIO_URL", lambda v: v.rstrip("/")),
    "label_studio_api_key": ("LABEL_STUDIO_API_KEY", str),
    "model_dir": ("MODEL_DIR", Path),
    "device": ("DEVICE", str),
    "basic_auth_user": ("BASIC_AUTH_USER", str),
    "basic_auth_pass": ("BASIC_AUTH_PASS", str),
    "polygon_tolerance_px": ("POLYGON_TOLERANCE_PX", _number(float, 0.0)),
    "mask_threshold": ("MASK_THRESHOLD", _number(float, 0.0, exclusive=True, maximum=1.0)),
    "min_region_px": ("MIN_REGION_PX", _number(int, 0)),
    "output_brush": ("OUTPUT_BRUSH", _bool),
    "log_level": ("LOG_LEVEL", _log_level),
    "max_request_bytes": ("MAX_REQUEST_BYTES", _number(int, 1)),
    "max_json_depth": ("MAX_JSON_DEPTH", _number(int, 1)),
    "max_tasks_per_request": ("MAX_TASKS_PER_REQUEST", _number(int, 1)),
    "max_boxes_per_task": ("MAX_BOXES_PER_TASK", _number(int, 1)),
    "request_deadline_s": ("REQUEST_DEADLINE_S", _number(float, 0.0, exclusive=True)),
    "max_image_pixels": ("MAX_IMAGE_PIXELS", _number(int, 1)),
    "max_image_bytes": ("MAX_IMAGE_BYTES", _number(int, 1)),
    "image_fetch_timeout_s": ("IMAGE_FETCH_TIMEOUT_S", _number(float, 0.0, exclusive=True)),
    "image_fetch_deadline_s": ("IMAGE_FETCH_DEADLINE_S", _number(float, 0.0, exclusive=True)),
    "image_cache_bytes": ("IMAGE_CACHE_BYTES", _number(int, 0)),
    "local_files_roots": ("LOCAL_FILES_ROOTS", _paths),
    "image_hosts_allowed": ("IMAGE_HOSTS_ALLOWED", _hosts),
    "max_concurrent_retrains": ("MAX_CONCURRENT_RETRAINS", _number(int, 1)),
    "retrain_every_n": ("RETRAIN_EVERY_N_ANNOTATIONS", _number(int, 0)),
    "retrain_args": ("RETRAIN_ARGS", _args),
}
__all__ = ["Settings", "SettingsError", "MIB"]
