"""Fetch and decode task images, from where they may come and within bounded memory and time.

Where an image field may point (:meth:`ImageLoader.resolve`):

* Label Studio's own files — ``/data/upload/…``, ``/data/local-files/?d=…`` (and the other
  :data:`LABEL_STUDIO_PATHS`), or an absolute URL on Label Studio's origin: fetched from
  ``LABEL_STUDIO_URL`` with the key of :class:`sim_backend.label_studio.LabelStudioConnection` (a PAT's
  access token, or a legacy token); a path that climbs out (``..``) is refused;
* other ``http(s)://`` URLs: fetched without any key, only when the host resolves to public addresses
  (private, loopback, link-local, reserved and IPv6 tunnels of IPv4 — NAT64, 6to4, Teredo — are refused
  unless the host is in ``IMAGE_HOSTS_ALLOWED``), checked again at every redirect; the download connects
  to the very address that was checked (no second DNS lookup, so a name cannot rebind in between), and
  a redirect from such a URL into Label Studio is refused (the key never follows a stranger's link);
* local files (a path or ``file://``): only regular files inside one of ``LOCAL_FILES_ROOTS`` (none by
  default), after resolving symlinks; FIFOs, devices and symlinks that leave the roots are refused.

Bounds: ``MAX_IMAGE_BYTES`` (a local file's size, a download's Content-Length, then a capped streamed
read of the bytes on the wire, and of the decompressed bytes when a server compresses anyway),
``IMAGE_FETCH_DEADLINE_S`` for a whole download (the DNS lookup, every redirect and read included: a
watchdog shuts the socket at the deadline, so a server that drips bytes cannot hold it longer),
``MAX_IMAGE_PIXELS`` before decoding, only the common image formats (:data:`IMAGE_FORMATS`) reach a
decoder, and a per-process cache of decoded images bounded by ``IMAGE_CACHE_BYTES`` and keyed by the
canonical location (one image under several spellings is cached once). EXIF orientation is applied
(browsers, hence Label Studio's percent coordinates, show images upright); 16-bit and other unusual
modes are scaled to 8 bits per channel. Anything that goes wrong raises :class:`ImageLoadError` with a
short message fit for a per-task error: what was refused and why, never a response body.
"""
from __future__ import annotations

import concurrent.futures
import io
import ipaddress
import logging
import os
import socket
import stat
import threading
import time
import urllib.parse
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import urllib3
from requests.adapters import HTTPAdapter
from PIL import Image, ImageOps, UnidentifiedImageError

from .label_studio import LabelStudioConnection, LabelStudioError, origin
from .settings import Settings

log = logging.getLogger(__name__)
# decode_image refuses every image above MAX_IMAGE_PIXELS with a message naming it; Pillow's warning for
# images between its limit and twice it would only repeat that in the log
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

#: Path prefixes that Label Studio serves (uploads, local files, cloud-storage proxy, task resolver).
LABEL_STUDIO_PATHS = ("/data/upload/", "/data/local-files/", "/storage-data/", "/tasks/")
#: Redirects followed by one download at most.
MAX_REDIRECTS = 5
#: Characters of an image field, URL or path quoted in a message.
QUOTE_CHARS = 120
#: The image formats that reach a decoder (PIL's names; "JPEG" also opens the MPO files of phone cameras).
#: Other parsers (EPS through Ghostscript, PSD, ICO, …) are never run on a task's bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
#: IPv6 ranges that carry an IPv4 address somewhere else (NAT64, 6to4, Teredo, IPv4-compatible): refused
#: for web images, since the address they lead to is not the one that is checked.
IPV6_TUNNELS = tuple(ipaddress.ip_network(n) for n in
                     ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96"))
_CHUNK = 1 << 16
_DNS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="image-dns")


class ImageLoadError(RuntimeError):
    """The task image cannot be fetched or decoded (refused, unreachable, not an image, too large, …).

    Attributes:
        transient: True when the server did not answer (connection failed or timed out, HTTP 5xx): the
            same request may succeed later, and a dead Label Studio shows this way.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of a value cut to ``limit`` characters (what messages and logs may echo of user input)."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit + 2 else text[: limit] + "…'"


#: Pixels converted at a time (whole rows) from Pillow's decoded image into the result: bounds every
#: temporary copy (a 16-bit strip's int64 copies: 3 x 8 bytes x this).
_STRIP_PIXELS = 1 << 18


def _to_uint8(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any PIL mode, 16-bit and float images scaled to 8 bits per channel.

    Memory: the result (3 bytes per pixel) beside Pillow's image; the pixels are copied and converted strip
    by strip (:data:`_STRIP_PIXELS` pixels), never as a whole-image copy (``np.asarray`` of a whole image
    costs twice its size in transient bytes, a 16-bit int64 copy four times).
    """
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    high = im.mode.startswith("I;16") or im.mode in ("I", "F")
    if high:
        lo, top = im.getextrema() if w and h else (0, 0)
        if im.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
    rows = max(1, _STRIP_PIXELS // max(w, 1))
    for r in range(0, h, rows):
        piece = im.crop((0, r, w, min(h, r + rows)))
        if not high:
            out[r:r + rows] = np.asarray(piece if piece.mode == "RGB" else piece.convert("RGB"))
            continue
        a = np.asarray(piece)
        if im.mode == "F":
            g = np.clip(np.nan_to_num(a.astype(np.float64) * scale), 0, 255)
        else:
            g = a.astype(np.int64)
            g = np.clip(g >> 8 if top <= 0xFFFF else g * 255 // max(int(top), 1), 0, 255)
        out[r:r + rows] = g.astype(np.uint8)[:, :, None]
    return out


def decode_image(data: bytes, max_pixels: int, source: str = "image") -> np.ndarray:
    """Decode image bytes to an upright 8-bit RGB array.

    Args:
        data: encoded image (JPEG, PNG, TIFF, …).
        max_pixels: largest accepted width x height (MAX_IMAGE_PIXELS), checked before the pixels are
            decoded. Pillow's own decompression-bomb limit is set from it (``PIL.Image.MAX_IMAGE_PIXELS``,
            process-wide), so the setting governs above Pillow's default 178,956,970 too, and an image
            that trips Pillow's limit is refused naming the setting.
        source: name of the image for error messages (already quoted and cut by the caller).

    Returns:
        (H, W, 3) uint8 RGB with the EXIF orientation applied (``PIL.ImageOps.exif_transpose``, in place);
        16-bit images keep their top 8 bits, float images in [0, 1] are scaled by 255. Peak memory, measured
        by ``python -m sim_backend.decode_benchmark`` (docs/benchmarks.md, ``backend-decode-memory``): about
        8 bytes per pixel for 16-bit and 8-bit RGB images (Pillow's decoded image plus the result; 387 MB at
        50 MPx, against 955 MB before the strips), one image at a time per request.

    Raises:
        ImageLoadError: not a decodable image of one of :data:`IMAGE_FORMATS`, or more than ``max_pixels``
            pixels.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses above 2x this (a bomb) at open, warns above 1x
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{source} is {w}x{h} = {w * h} pixels, above MAX_IMAGE_PIXELS={max_pixels}")
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            arr = _to_uint8(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{source} has more pixels than MAX_IMAGE_PIXELS={max_pixels} allows ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"{source} is not a readable image: {str(e)[:QUOTE_CHARS]}") from e
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class ImageSource:
    """Where an image field points, as :meth:`ImageLoader.resolve` decided.

    Attributes:
        kind: "file" (a local file), "label_studio" (Label Studio's origin, sent the key) or "web".
        location: the canonical path or URL (the cache key).
    """

    kind: str
    location: str


def _split_url(url: str, source: str) -> tuple[urllib.parse.SplitResult, tuple[str, str, int]]:
    """``urlsplit`` and :func:`origin` of a URL, a malformed one (bad port, unbalanced brackets) refused.

    Raises:
        ImageLoadError: the URL cannot be parsed.
    """
    try:
        return urllib.parse.urlsplit(url), origin(url)
    except ValueError as e:
        raise ImageLoadError(f"refused {source}: malformed URL ({str(e)[:80]})") from e


def _canonical_url(url: str) -> str:
    """The URL with its scheme and host in lower case, without a default port, credentials or fragment."""
    u, (scheme, host, port) = _split_url(url, quoted(url))
    name = f"[{host}]" if ":" in host else host
    netloc = name if port == {"http": 80, "https": 443}.get(scheme) else f"{name}:{port}"
    return urllib.parse.urlunsplit((scheme, netloc, u.path or "/", u.query, ""))


def _climbs(path: str) -> bool:
    """Whether a URL path (or a ``d=`` file parameter) has a ``..`` segment once percent-decoded."""
    decoded = urllib.parse.unquote(urllib.parse.unquote(path))
    return ".." in decoded.replace("\\", "/").split("/")


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a web image may be fetched from this address: global unicast, not an IPv6 tunnel of IPv4
    (:data:`IPV6_TUNNELS`); an IPv4-mapped IPv6 address is judged by its IPv4 address."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 6 and any(ip in n for n in IPV6_TUNNELS):
        return False
    return ip.is_global and not ip.is_multicast


class _PinnedAdapter(HTTPAdapter):
    """requests' HTTP adapter that connects to ``request.pinned_address`` when a request carries one (the
    address :meth:`ImageLoader._check_host` approved), keeping the host name for SNI and the certificate
    check (the Host header is set by the caller): no second DNS lookup, so no DNS rebinding."""

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        """requests' pool key with the host replaced by the pinned address (HTTPS: SNI and hostname kept)."""
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        address = getattr(request, "pinned_address", None)
        if address is not None:
            name = host_params["host"]
            host_params = dict(host_params, host=address)
            if host_params["scheme"] == "https":
                pool_kwargs = dict(pool_kwargs, server_hostname=name, assert_hostname=name)
        return host_params, pool_kwargs


class _Watchdog:
    """Shut a streamed response's socket at the deadline, so that no read outlives it (a context manager)."""

    def __init__(self, response: requests.Response, deadline: float):
        self.response = response
        self.timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._shut)
        self.timer.daemon = True

    def _shut(self) -> None:
        sock = getattr(getattr(self.response.raw, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


class ImageLoader:
    """Load task images (module docstring).

    Args:
        settings: the limits, the roots of local files, the allowed hosts, Label Studio's URL and key.
        session: optional ``requests.Session`` (connection reuse; tests); its http(s) adapters are replaced
            by one that connects to checked addresses only.
        connection: Label Studio connection to use (default: one from ``settings``' URL and key, if both set).

    Thread-safe; one instance per process is enough.
    """

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 connection: LabelStudioConnection | None = None):
        self.settings = settings
        self._session = session or requests.Session()
        self._session.trust_env = False  # no proxies or .netrc credentials from the environment
        adapter = _PinnedAdapter()
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        if connection is None and settings.label_studio_url and settings.label_studio_api_key:
            connection = LabelStudioConnection(settings.label_studio_url, settings.label_studio_api_key,
                                               settings.image_fetch_timeout_s)
        self.connection = connection
        self._roots = tuple(str(Path(r).resolve()) for r in settings.local_files_roots)

    # -- Label Studio connection ------------------------------------------------------------
    @property
    def label_studio_url(self) -> str:
        """Label Studio's base URL ("" when unknown)."""
        conn = self.connection
        return conn.url if conn is not None else ""

    def remember_label_studio(self, hostname: str | None, access_token: str | None) -> bool:
        """Use /setup's ``hostname`` and ``access_token`` as Label Studio's URL and key, in this process.

        Only when the backend requires basic auth (so that the caller is a Label Studio that knows the
        backend's password) and the environment sets neither LABEL_STUDIO_URL nor LABEL_STUDIO_API_KEY:
        an anonymous /setup must never redirect the key, nor the backend's image fetches, to another
        host, and a key from the environment never goes to a host that /setup names. /setup reaches one
        worker: with several, set both variables.

        Args:
            hostname: Label Studio's URL as /setup sent it (``http(s)://host[:port][/path]``).
            access_token: the token /setup sent (the project creator's legacy token on Label Studio 1.23).

        Returns:
            Whether they are used.
        """
        s = self.settings
        if s.label_studio_url and s.label_studio_api_key:
            return False
        if not s.basic_auth or s.label_studio_url or s.label_studio_api_key:
            if hostname or access_token:
                log.warning("/setup sent hostname %s and a token: ignored (set both LABEL_STUDIO_URL and "
                            "LABEL_STUDIO_API_KEY; or neither, with BASIC_AUTH_USER/BASIC_AUTH_PASS, to accept them)",
                            quoted(hostname))
            return False
        url, key = str(hostname or "").rstrip("/"), str(access_token or "")
        try:
            scheme = origin(url)[0]
        except ValueError:
            return False
        if not url or not key or scheme not in ("http", "https"):
            return False
        with self._lock:
            if self.connection is None or (self.connection.url, self.connection.api_key) != (url, key):
                self.connection = LabelStudioConnection(url, key, s.image_fetch_timeout_s)
        return True

    # -- where an image comes from ------------------------------------------------------------
    def resolve(self, field) -> ImageSource:
        """Decide where an image field points and whether that is allowed (module docstring).

        Args:
            field: the task's image field: an http(s) URL, a Label Studio path (``/data/upload/…``), a
                ``file://`` URL or a local path.

        Returns:
            the :class:`ImageSource` (kind and canonical location).

        Raises:
            ImageLoadError: not a non-empty string, a control character, a malformed URL, an unsupported
                scheme, a Label Studio path without a known Label Studio or one that climbs out (``..``),
                or a local path outside the roots.
        """
        if not isinstance(field, str) or not field.strip():
            raise ImageLoadError(f"the image field must be a non-empty string (a URL or a path), got "
                                 f"{type(field).__name__} {quoted(field, 60)}")
        if len(field) > 8192:
            raise ImageLoadError(f"the image field is {len(field)} characters long, more than a URL or path can be: "
                                 f"{quoted(field)}")
        value = field.strip()
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ImageLoadError(f"the image field holds a control character: {quoted(value)}")
        conn = self.connection
        parsed, (scheme, _, _) = _split_url(value, quoted(value))
        if scheme in ("http", "https"):
            if conn is not None and conn.owns(value):
                return self._label_studio(value, conn)
            return ImageSource("web", _canonical_url(value))
        if scheme == "file":
            return ImageSource("file", self._local(urllib.parse.unquote(parsed.path)))
        if scheme and len(scheme) > 1:  # (one letter: a Windows drive)
            raise ImageLoadError(f"unsupported image URL scheme {scheme!r} in {quoted(value)}")
        if value.startswith("/data/") or value.startswith(LABEL_STUDIO_PATHS):
            if self._under_roots(os.path.realpath(value)) and os.path.isfile(value):
                return ImageSource("file", os.path.realpath(value))  # a local copy of Label Studio's files
            if conn is None:
                raise ImageLoadError(f"{quoted(value)} is a Label Studio path but LABEL_STUDIO_URL and "
                                     f"LABEL_STUDIO_API_KEY are not set")
            return self._label_studio(conn.url + value, conn)
        return ImageSource("file", self._local(value))

    @staticmethod
    def _label_studio(url: str, conn: LabelStudioConnection) -> ImageSource:
        """A URL on Label Studio's origin, allowed only on a file path (:data:`LABEL_STUDIO_PATHS` below its
        base path, no ``..``)."""
        u, _ = _split_url(url, quoted(url))
        base = urllib.parse.urlsplit(conn.url).path.rstrip("/")
        path = u.path[len(base):] if base and u.path.startswith(base + "/") else u.path
        files = urllib.parse.parse_qs(u.query).get("d", [])
        if _climbs(path) or any(_climbs(d) for d in files) or not path.startswith(LABEL_STUDIO_PATHS):
            raise ImageLoadError(f"refused {quoted(url)}: not a Label Studio file path (it must start with one of "
                                 f"{', '.join(LABEL_STUDIO_PATHS)} and hold no '..')")
        return ImageSource("label_studio", _canonical_url(url))

    def _under_roots(self, real: str) -> bool:
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self._roots)

    def _local(self, path: str) -> str:
        if not self._roots:
            raise ImageLoadError(f"refused local file {quoted(path)}: no LOCAL_FILES_ROOTS are configured")
        try:
            real = os.path.realpath(path)
        except (ValueError, OSError) as e:
            raise ImageLoadError(f"refused local file {quoted(path)}: {e.__class__.__name__}") from e
        if not self._under_roots(real):
            raise ImageLoadError(f"refused local file {quoted(path)}: outside LOCAL_FILES_ROOTS "
                                 f"(symlinks are resolved)")
        return real

    # -- reading -------------------------------------------------------------------------------
    def _read_file(self, path: str, source: str) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise ImageLoadError(f"cannot read image file {source}: {e.strerror or e.__class__.__name__}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageLoadError(f"refused {source}: not a regular file")
            if st.st_size > self.settings.max_image_bytes:
                raise ImageLoadError(f"refused {source}: {st.st_size} bytes, above MAX_IMAGE_BYTES="
                                     f"{self.settings.max_image_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as f:
                # f.read(n) allocates n bytes first: ask for the file's size (+1 to see it grow), not the limit
                data = f.read(min(st.st_size, self.settings.max_image_bytes) + 1)
        finally:
            os.close(fd)
        if len(data) > self.settings.max_image_bytes:
            raise ImageLoadError(f"refused {source}: above MAX_IMAGE_BYTES={self.settings.max_image_bytes}")
        return data

    def _deadline_error(self, source: str) -> ImageLoadError:
        return ImageLoadError(f"cannot fetch {source}: IMAGE_FETCH_DEADLINE_S={self.settings.image_fetch_deadline_s} "
                              f"exceeded", transient=True)

    def _check_host(self, url: str, source: str, deadline: float) -> str | None:
        """Refuse a web host that resolves to a non-public address, unless IMAGE_HOSTS_ALLOWED names it.

        Returns:
            the checked address to connect to, or None for a host allowed by name (resolved as usual).

        Raises:
            ImageLoadError: not http(s), no host, does not resolve (in time), or a refused address.
        """
        _, (scheme, host, port) = _split_url(url, source)
        if scheme not in ("http", "https") or not host:
            raise ImageLoadError(f"refused {source}: only http(s) URLs with a host can be fetched")
        allowed = self.settings.image_hosts_allowed
        if host in allowed:
            return None
        try:
            infos = _DNS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(
                timeout=max(deadline - time.monotonic(), 0.0))
        except concurrent.futures.TimeoutError:
            raise self._deadline_error(source) from None
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise ImageLoadError(f"cannot fetch {source}: the host {quoted(host, 60)} does not resolve") from e
        nets = [ipaddress.ip_network(a, strict=False) for a in allowed if "/" in a]
        addresses = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            addresses.append(str(ip))
            if str(ip) in allowed or any(ip in n for n in nets if n.version == ip.version):
                continue
            if not is_public_address(ip):
                raise ImageLoadError(f"refused {source}: its host resolves to a private, loopback, link-local or "
                                     f"tunnelled address (add the host to IMAGE_HOSTS_ALLOWED to allow it)")
        if not addresses:
            raise ImageLoadError(f"cannot fetch {source}: the host {quoted(host, 60)} does not resolve")
        return addresses[0]

    def _get(self, url: str, headers: dict, address: str | None, timeout: float) -> requests.Response:
        """One GET without redirects, streamed, connecting to ``address`` when given (:class:`_PinnedAdapter`)."""
        prep = self._session.prepare_request(requests.Request("GET", url, headers=headers))
        if address is not None:
            u = urllib.parse.urlsplit(url)
            prep.headers["Host"] = u.netloc.rpartition("@")[2]
            prep.pinned_address = address
        return self._session.send(prep, stream=True, allow_redirects=False, timeout=(timeout, timeout))

    def _fetch(self, src: ImageSource, source: str, deadline: float) -> bytes:
        """Download an image: redirects followed by hand (each target checked), the key to Label Studio only."""
        s = self.settings
        conn = self.connection  # one snapshot: a concurrent /setup never sends a new key to the old origin
        url, refreshed, left_label_studio = src.location, False, False
        for _ in range(MAX_REDIRECTS + 1):
            to_ls = conn is not None and conn.owns(url)
            if to_ls and left_label_studio:
                raise ImageLoadError(f"refused {source}: a web image redirects into Label Studio")
            if to_ls:
                self._label_studio(url, conn)  # every hop on Label Studio's origin is a file path
                address = None
            else:
                left_label_studio = True
                address = self._check_host(url, source, deadline)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._deadline_error(source)
            headers = {"Accept-Encoding": "identity"}
            if to_ls:
                try:
                    headers.update(conn.auth_headers())
                except LabelStudioError as e:
                    raise ImageLoadError(f"cannot fetch {source}: {e}", transient=True) from e
            try:
                r = self._get(url, headers, address, min(s.image_fetch_timeout_s, left))
            except requests.Timeout as e:
                raise ImageLoadError(f"cannot fetch {source}: timed out", transient=True) from e
            except requests.RequestException as e:
                raise ImageLoadError(f"cannot fetch {source}: connection failed ({e.__class__.__name__})",
                                     transient=True) from e
            with r, _Watchdog(r, deadline):
                if r.is_redirect and r.headers.get("Location"):
                    url = urllib.parse.urljoin(url, r.headers["Location"])
                    if any(ord(c) < 32 or ord(c) == 127 for c in url):
                        raise ImageLoadError(f"refused {source}: a redirect to a URL with a control character")
                    _split_url(url, source)
                    continue
                if r.status_code == 401 and to_ls and not refreshed:
                    conn.refresh()  # an access token revoked or expired early: exchange the PAT again
                    refreshed = True
                    continue
                if r.status_code != 200:
                    hint = (f" (check LABEL_STUDIO_API_KEY: Label Studio refused the {conn.kind})"
                            if to_ls and r.status_code in (401, 403) else "")
                    raise ImageLoadError(f"fetching {source} returned HTTP {r.status_code}{hint}",
                                         transient=r.status_code >= 500)
                return self._read_body(r, source, deadline)
        raise ImageLoadError(f"cannot fetch {source}: more than {MAX_REDIRECTS} redirects")

    def _read_body(self, r: requests.Response, source: str, deadline: float) -> bytes:
        """The body as sent (at most MAX_IMAGE_BYTES), then decompressed when the server gzipped or deflated it
        anyway (the result capped too); a body that is not finished by the deadline is refused."""
        cap = self.settings.max_image_bytes
        length = r.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise ImageLoadError(f"refused {source}: Content-Length {length} above MAX_IMAGE_BYTES={cap}")
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            raise ImageLoadError(f"refused {source}: Content-Encoding {quoted(encoding, 30)}")
        buf = bytearray()
        try:
            while True:
                chunk = r.raw.read1(_CHUNK, decode_content=False)  # what has arrived, not a full chunk
                if time.monotonic() > deadline:
                    raise self._deadline_error(source)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > cap:
                    raise ImageLoadError(f"refused {source}: more than MAX_IMAGE_BYTES={cap} bytes")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise self._deadline_error(source) from e
            raise ImageLoadError(f"cannot fetch {source}: the download broke off ({e.__class__.__name__})",
                                 transient=True) from e
        if encoding in ("", "identity"):
            return bytes(buf)
        try:
            d = zlib.decompressobj(zlib.MAX_WBITS | 32 if "gzip" in encoding else zlib.MAX_WBITS)
            data = d.decompress(bytes(buf), cap + 1)
        except zlib.error as e:
            raise ImageLoadError(f"refused {source}: a broken {encoding} body") from e
        if len(data) > cap:
            raise ImageLoadError(f"refused {source}: more than MAX_IMAGE_BYTES={cap} bytes once decompressed")
        return data

    def load(self, field, deadline: float | None = None) -> np.ndarray:
        """The upright RGB image of a task image field.

        Args:
            field: the task's image field (module docstring).
            deadline: ``time.monotonic()`` by which a download must end (default: IMAGE_FETCH_DEADLINE_S
                from now; the earlier of both when given).

        Returns:
            (H, W, 3) uint8 RGB, shared with the cache: read-only.

        Raises:
            ImageLoadError: refused, unreachable, unreadable, not an image, or above a limit.
        """
        src = self.resolve(field)
        with self._lock:
            hit = self._cache.get(src.location)
            if hit is not None:
                self._cache.move_to_end(src.location)
                return hit
        source = quoted(field)
        end = time.monotonic() + self.settings.image_fetch_deadline_s
        end = min(end, deadline) if deadline is not None else end
        data = self._read_file(src.location, source) if src.kind == "file" else self._fetch(src, source, end)
        image = decode_image(data, self.settings.max_image_pixels, source=source)
        image.setflags(write=False)
        self._remember(src.location, image)
        return image

    def _remember(self, key: str, image: np.ndarray) -> None:
        cap = self.settings.image_cache_bytes
        if image.nbytes > cap:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = image
            self._cache_bytes += image.nbytes
            while self._cache_bytes > cap:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes

    @property
    def cache_bytes(self) -> int:
        """Bytes of decoded images held by the cache now."""
        return self._cache_bytes


__all__ = ["ImageLoader", "ImageLoadError", "ImageSource", "decode_image", "is_public_address", "quoted",
           "IMAGE_FORMATS", "LABEL_STUDIO_PATHS"]
