"""Fetch and decode task images: Label Studio URLs (with the API token), http(s) URLs, local files.

Accepted image fields:

* ``/data/upload/…`` and ``/data/local-files/?d=…`` (and the other :data:`LABEL_STUDIO_PATHS`,
  unless such a local file exists): fetched from ``LABEL_STUDIO_URL`` with the header
  ``Authorization: Token <LABEL_STUDIO_API_KEY>``;
* ``http(s)://…``: fetched as is; the token is added only when the URL is on ``LABEL_STUDIO_URL``;
* a local file path, or ``file://…``.

Decoded images are kept in a per-process LRU cache keyed by the image field. EXIF orientation is
applied (browsers, hence Label Studio's percent coordinates, show images upright). Anything that
goes wrong raises :class:`ImageLoadError` with a message fit for a per-task error.
"""
from __future__ import annotations

import io
import logging
import threading
import urllib.parse
from collections import OrderedDict
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from .settings import Settings

log = logging.getLogger(__name__)


#: Path prefixes that Label Studio serves (uploads, local files, cloud-storage proxy, API).
LABEL_STUDIO_PATHS = ("/data/", "/tasks/", "/storage-data/", "/api/")


class ImageLoadError(RuntimeError):
    """The task image cannot be fetched or decoded (unreachable, not an image, too large, …)."""


def decode_image(data: bytes, max_pixels: int, source: str = "image") -> np.ndarray:
    """Decode image bytes to an upright RGB array.

    Args:
        data: encoded image (JPEG, PNG, …).
        max_pixels: largest accepted width x height, checked before the pixels are decoded.
        source: name of the image for error messages.

    Returns:
        (H, W, 3) uint8 RGB with the EXIF orientation applied (``PIL.ImageOps.exif_transpose``).

    Raises:
        ImageLoadError: not a decodable image, or more than ``max_pixels`` pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{source} is {w}x{h} = {w * h} pixels, above MAX_IMAGE_PIXELS={max_pixels}")
            im.load()
            im = ImageOps.exif_transpose(im)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ImageLoadError(f"{source} is not a readable image: {e}") from e
    return np.ascontiguousarray(arr)


class ImageLoader:
    """Load task images with an LRU cache.

    Args:
        settings: uses ``label_studio_url``, ``label_studio_api_key``, ``max_image_pixels``,
            ``image_cache_size`` and ``image_fetch_timeout_s``.
        session: optional ``requests.Session`` (connection reuse; tests).

    Thread-safe; one instance per process is enough.
    """

    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.settings = settings
        self._session = session or requests.Session()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        # Fallbacks learnt from /setup (hostname, access_token) when the environment lacks them.
        self._ls_url_fallback = ""
        self._ls_key_fallback = ""

    # -- Label Studio connection ------------------------------------------------------------
    def remember_label_studio(self, hostname: str | None, access_token: str | None) -> None:
        """Use /setup's ``hostname`` and ``access_token`` when LABEL_STUDIO_URL / _API_KEY are unset."""
        if hostname:
            self._ls_url_fallback = str(hostname).rstrip("/")
        if access_token:
            self._ls_key_fallback = str(access_token)

    @property
    def label_studio_url(self) -> str:
        return self.settings.label_studio_url or self._ls_url_fallback

    @property
    def label_studio_api_key(self) -> str:
        return self.settings.label_studio_api_key or self._ls_key_fallback

    def resolve(self, url: str) -> tuple[str, str, dict]:
        """Decide how to read an image field.

        Returns:
            (kind, location, headers): kind is ``"file"`` (location: a path) or ``"http"``
            (location: an absolute URL; headers carry the token for Label Studio URLs).

        Raises:
            ImageLoadError: an empty field, an unsupported scheme (s3://, gs://, …), or a Label Studio
                path while LABEL_STUDIO_URL is unknown.
        """
        if not isinstance(url, str) or not url.strip():
            raise ImageLoadError(f"image field is empty or not a string: {url!r}")
        url = url.strip()
        parsed = urllib.parse.urlparse(url)
        scheme = parsed.scheme.lower()
        ls_url = self.label_studio_url
        token = {"Authorization": f"Token {self.label_studio_api_key}"} if self.label_studio_api_key else {}
        if scheme in ("http", "https"):
            on_ls = bool(ls_url) and url.startswith(ls_url + "/")
            return "http", url, (token if on_ls else {})
        if scheme == "file":
            return "file", urllib.parse.unquote(parsed.path), {}
        if scheme and len(scheme) > 1:  # (one letter: a Windows drive)
            raise ImageLoadError(f"unsupported image URL scheme {scheme!r} in {url!r}")
        if url.startswith(LABEL_STUDIO_PATHS) and not Path(url).is_file():
            if not ls_url:
                raise ImageLoadError(
                    f"{url!r} is a Label Studio path but LABEL_STUDIO_URL is not set (nor sent by /setup)")
            return "http", ls_url + url, token
        return "file", url, {}

    # -- loading -------------------------------------------------------------------------------
    def _fetch(self, url: str) -> bytes:
        kind, location, headers = self.resolve(url)
        if kind == "file":
            try:
                return Path(location).read_bytes()
            except OSError as e:
                raise ImageLoadError(f"cannot read image file {location!r}: {e.strerror or e}") from e
        try:
            r = self._session.get(location, headers=headers, timeout=self.settings.image_fetch_timeout_s)
        except requests.RequestException as e:
            raise ImageLoadError(f"cannot fetch {location}: {e.__class__.__name__}: {e}") from e
        if r.status_code != 200:
            hint = " (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403) else ""
            raise ImageLoadError(f"fetching {location} returned HTTP {r.status_code}{hint}")
        return r.content

    def load(self, url: str) -> np.ndarray:
        """The upright RGB image of a task image field.

        Args:
            url: the task's image field (see the module docstring for accepted forms).

        Returns:
            (H, W, 3) uint8 RGB, shared with the cache: do not modify it in place.

        Raises:
            ImageLoadError: unreachable, unreadable, not an image, or above MAX_IMAGE_PIXELS.
        """
        with self._lock:
            if url in self._cache:
                self._cache.move_to_end(url)
                return self._cache[url]
        image = decode_image(self._fetch(url), self.settings.max_image_pixels, source=repr(url))
        image.setflags(write=False)
        if self.settings.image_cache_size > 0:
            with self._lock:
                self._cache[url] = image
                self._cache.move_to_end(url)
                while len(self._cache) > self.settings.image_cache_size:
                    self._cache.popitem(last=False)
        return image
