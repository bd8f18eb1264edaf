"""The product's settings, read once from the environment: the only place that reads it.

Every limit of the server is an environment variable (see :meth:`Settings.from_env`); the training
commands import :class:`Settings` to reach Label Studio and the model directory.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping


class SettingsError(ValueError):
    """Raised when an environment variable holds a value of the wrong type or range."""


def _parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true/false, 1/0, yes/no)")


def _parse_number(name: str, raw: str, kind: type, minimum: float) -> float | int:
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """Configuration of the ML backend.

    Attributes (environment variable in brackets):
        label_studio_url: base URL of Label Studio, e.g. ``http://localhost:8080`` [LABEL_STUDIO_URL];
            used to fetch ``/data/upload/…`` and ``/data/local-files/?d=…`` images and by ``training``.
        label_studio_api_key: API token, sent as ``Authorization: Token <key>`` [LABEL_STUDIO_API_KEY].
        model_dir: root of the model registry (:class:`sim_model.registry.ModelRegistry`) [MODEL_DIR,
            default ``./models``].
        polygon_tolerance_px: polygon simplification tolerance in pixels, the ``epsilon`` of
            ``cv2.approxPolyDP`` [POLYGON_TOLERANCE_PX, default 1.0]; 0 keeps every contour pixel.
            A /predict request may override it with ``params.polygon_tolerance_px``.
        mask_threshold: probability at or above which a mask pixel is foreground [MASK_THRESHOLD, 0.5].
        min_region_px: connected mask parts smaller than this many pixels are dropped as specks,
            except the largest part of a mask, which is always kept [MIN_REGION_PX, default 16].
        max_image_pixels: images with more pixels (width x height) are refused [MAX_IMAGE_PIXELS,
            default 50 000 000].
        image_cache_size: number of decoded images kept in the per-process LRU cache, keyed by URL
            [IMAGE_CACHE_SIZE, default 32; 0 disables the cache].
        image_fetch_timeout_s: timeout in seconds of one HTTP image request [IMAGE_FETCH_TIMEOUT_S, 10].
        output_brush: also answer brushlabels regions when the labeling config has BrushLabels
            [OUTPUT_BRUSH, default true].
        log_level: Python logging level name [LOG_LEVEL, default INFO].
        retrain_every_n: start a retrain after every N new annotations of a project, 0 = off
            [RETRAIN_EVERY_N_ANNOTATIONS, default 0].
        retrain_args: extra arguments of the retrains the webhook starts, split like a shell would
            [RETRAIN_ARGS, e.g. ``"--max-iter 500 --tolerance 0.01"``].
    """

    label_studio_url: str = ""
    label_studio_api_key: str = ""
    model_dir: Path = field(default_factory=lambda: Path("./models"))
    polygon_tolerance_px: float = 1.0
    mask_threshold: float = 0.5
    min_region_px: int = 16
    max_image_pixels: int = 50_000_000
    image_cache_size: int = 32
    image_fetch_timeout_s: float = 10.0
    output_brush: bool = True
    log_level: str = "INFO"
    retrain_every_n: int = 0
    retrain_args: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from environment variables (unset ones keep their defaults).

        Args:
            environ: mapping to read instead of ``os.environ`` (tests).

        Raises:
            SettingsError: a variable that does not parse or is out of range, naming the variable.
        """
        env = os.environ if environ is None else environ
        d = cls()
        kw: dict = {}

        def get(name: str) -> str | None:
            v = env.get(name)
            return None if v is None or v.strip() == "" else v.strip()

        if (v := get("LABEL_STUDIO_URL")) is not None:
            kw["label_studio_url"] = v.rstrip("/")
        if (v := get("LABEL_STUDIO_API_KEY")) is not None:
            kw["label_studio_api_key"] = v
        if (v := get("MODEL_DIR")) is not None:
            kw["model_dir"] = Path(v)
        if (v := get("POLYGON_TOLERANCE_PX")) is not None:
            kw["polygon_tolerance_px"] = float(_parse_number("POLYGON_TOLERANCE_PX", v, float, 0.0))
        if (v := get("MASK_THRESHOLD")) is not None:
            t = float(_parse_number("MASK_THRESHOLD", v, float, 0.0))
            if not 0.0 < t <= 1.0:
                raise SettingsError(f"MASK_THRESHOLD={v!r} must be in (0, 1]")
            kw["mask_threshold"] = t
        if (v := get("MIN_REGION_PX")) is not None:
            kw["min_region_px"] = int(_parse_number("MIN_REGION_PX", v, int, 0))
        if (v := get("MAX_IMAGE_PIXELS")) is not None:
            kw["max_image_pixels"] = int(_parse_number("MAX_IMAGE_PIXELS", v, int, 1))
        if (v := get("IMAGE_CACHE_SIZE")) is not None:
            kw["image_cache_size"] = int(_parse_number("IMAGE_CACHE_SIZE", v, int, 0))
        if (v := get("IMAGE_FETCH_TIMEOUT_S")) is not None:
            t = float(_parse_number("IMAGE_FETCH_TIMEOUT_S", v, float, 0.0))
            if t <= 0:
                raise SettingsError(f"IMAGE_FETCH_TIMEOUT_S={v!r} must be > 0")
            kw["image_fetch_timeout_s"] = t
        if (v := env.get("OUTPUT_BRUSH")) is not None:
            kw["output_brush"] = _parse_bool("OUTPUT_BRUSH", v)
        if (v := get("LOG_LEVEL")) is not None:
            if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                raise SettingsError(f"LOG_LEVEL={v!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
            kw["log_level"] = v.upper()
        if (v := get("RETRAIN_EVERY_N_ANNOTATIONS")) is not None:
            kw["retrain_every_n"] = int(_parse_number("RETRAIN_EVERY_N_ANNOTATIONS", v, int, 0))
        if (v := get("RETRAIN_ARGS")) is not None:
            try:
                kw["retrain_args"] = tuple(shlex.split(v))
            except ValueError as e:
                raise SettingsError(f"RETRAIN_ARGS={v!r} does not split into arguments: {e}") from None
        return replace(d, **kw)
