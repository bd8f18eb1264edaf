"""Talking to Label Studio: one connection (URL + key) for the API and for image downloads, its errors,
the task listing.

Label Studio ≥ 1.20 gives users Personal Access Tokens (JWT refresh tokens, exchanged at
``POST /api/token/refresh/`` for access tokens of a few minutes, sent as ``Authorization: Bearer``);
organisations may also allow legacy tokens (``Authorization: Token``). :class:`LabelStudioConnection`
leaves the choice and the exchange to label-studio-sdk's own client, and hands the same header to the
backend's image downloads (:mod:`sim_backend.images`), renewing an access token before it expires and
once more when Label Studio answers 401. The key only ever goes to Label Studio's own origin.
"""
from __future__ import annotations

import threading
import time
import urllib.parse
from typing import Iterator

import httpx
import jwt
import requests
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError

#: An access token with less than this many seconds left is renewed before use.
TOKEN_RENEW_MARGIN_S = 60.0


class LabelStudioError(RuntimeError):
    """Label Studio refused a request (unknown project, bad API key, unusable labeling config, …)."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio does not answer (connection refused or reset, timeout, HTTP 5xx)."""


def key_kind(api_key: str) -> str:
    """"personal access token" for a JWT refresh token, "access token" for a JWT access token, else "legacy token"."""
    try:
        claims = jwt.decode(api_key, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return "legacy token"
    return "personal access token" if claims.get("token_type") == "refresh" else "access token"


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, lower-case host, port) of a URL, the default port filled in.

    Raises:
        ValueError: a malformed URL (a port that is not a number in 0–65535, unbalanced IPv6 brackets).
    """
    u = urllib.parse.urlsplit(url)
    scheme = (u.scheme or "").lower()
    return scheme, (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(scheme, 0)


class LabelStudioConnection:
    """Label Studio's URL and API key, and the ``Authorization`` header every request to it carries.

    Args:
        url: Label Studio's base URL, e.g. ``http://localhost:8080``.
        api_key: a Personal Access Token or a legacy token (:func:`key_kind`).
        timeout: seconds per API request.

    Thread-safe. :meth:`client` is label-studio-sdk's client (it exchanges a PAT for access tokens);
    :meth:`auth_headers` is the header of that client for requests made outside it (image downloads).

    Raises:
        LabelStudioError: URL or key missing (at construction).
    """

    def __init__(self, url: str, api_key: str, timeout: float = 30.0):
        if not url:
            raise LabelStudioError("no Label Studio URL: pass --url or set LABEL_STUDIO_URL")
        if not api_key:
            raise LabelStudioError("no Label Studio API key: pass --api-key or set LABEL_STUDIO_API_KEY")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.kind = key_kind(api_key)
        self._lock = threading.Lock()
        self._client: LabelStudio | None = None

    def client(self) -> LabelStudio:
        """label-studio-sdk's client (built on first use; rebuilt by :meth:`refresh`)."""
        with self._lock:
            if self._client is None:
                self._client = LabelStudio(base_url=self.url, api_key=self.api_key, timeout=self.timeout,
                                           max_retries=0)
            return self._client

    def project(self, project: int | str):
        """The project (label-studio-sdk's ``Project``: ``label_config``, ``title``, …).

        Raises:
            LabelStudioError: unknown project or refused key (also when building the client refuses an
                expired PAT).
            LabelStudioUnavailable: Label Studio does not answer.
        """
        try:
            return self.client().projects.get(id=int(project))
        except Exception as e:
            raise sdk_error(e, self.url, f"reading project {project}") from e

    def refresh(self) -> None:
        """Forget the access token: the next request exchanges the PAT again (after a 401, or near expiry)."""
        with self._lock:
            self._client = None

    def auth_headers(self) -> dict[str, str]:
        """``{"Authorization": …}`` for a request to Label Studio: ``Token <legacy key>``, or ``Bearer <access
        token>`` with at least :data:`TOKEN_RENEW_MARGIN_S` seconds left.

        Raises:
            LabelStudioError: Label Studio refused the key (an expired or revoked PAT).
            LabelStudioUnavailable: Label Studio does not answer the token exchange.
        """
        for attempt in range(2):
            try:
                # the SDK's own header: "Token <key>", or "Bearer <access>" after exchanging a PAT
                header = self.client()._client_wrapper.get_headers()["Authorization"]
            except Exception as e:
                raise sdk_error(e, self.url, f"exchanging the {self.kind} for an access token") from e
            scheme, _, token = header.partition(" ")
            if scheme != "Bearer" or attempt or _seconds_left(token) > TOKEN_RENEW_MARGIN_S:
                return {"Authorization": header}
            self.refresh()
        return {"Authorization": header}

    def owns(self, url: str) -> bool:
        """Whether ``url`` is on Label Studio's origin (same scheme, host and port): only there goes the key.
        A malformed URL is nobody's."""
        try:
            return origin(url) == origin(self.url)
        except ValueError:
            return False


def _seconds_left(token: str) -> float:
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.InvalidTokenError:
        return float("inf")
    return float("inf") if exp is None else float(exp) - time.time()


def sdk_error(e: Exception, url: str, what: str) -> LabelStudioError:
    """The :class:`LabelStudioError` (or :class:`LabelStudioUnavailable`) that an SDK exception means.

    Args:
        e: what the SDK raised.
        url: Label Studio's URL (for the message).
        what: the request, e.g. "reading project 12".
    """
    if isinstance(e, httpx.TransportError):
        return LabelStudioUnavailable(f"Label Studio at {url} does not answer ({what}): {e.__class__.__name__}: {e}")
    if isinstance(e, ApiError):
        code = e.status_code
        if code is not None and code >= 500:
            return LabelStudioUnavailable(f"Label Studio at {url} failed ({what}): HTTP {code}")
        hint = " (check the API key)" if code in (401, 403) else (" (no such project?)" if code == 404 else "")
        return LabelStudioError(f"Label Studio at {url} refused {what}: HTTP {code}{hint}: {str(e.body)[:200]}")
    return LabelStudioError(f"Label Studio at {url}: {what} failed: {e.__class__.__name__}: {e}")


def iter_project_tasks(client: LabelStudio, project: int | str, url: str, page_size: int = 100) -> Iterator[dict]:
    """Every task of a project with its annotations and predictions, as plain dicts (paged by the SDK).

    Args:
        client: label-studio-sdk's client (:meth:`LabelStudioConnection.client`).
        project: project id (int or a string of digits).
        url: Label Studio's URL, for error messages only.
        page_size: tasks per API page.

    Raises:
        LabelStudioError / LabelStudioUnavailable: on a transport or HTTP error (even mid-way).
    """
    try:
        for t in client.tasks.list(project=int(project), fields="all", page_size=page_size):
            yield t if isinstance(t, dict) else t.dict()
    except LabelStudioError:
        raise
    except Exception as e:  # httpx / ApiError / pydantic errors from the SDK
        raise sdk_error(e, url, f"listing the tasks of project {project}") from e


def label_studio_alive(url: str, timeout: float = 5.0) -> bool:
    """Whether Label Studio at ``url`` answers ``GET /health`` (any HTTP answer below 500 counts)."""
    try:
        return requests.get(url.rstrip("/") + "/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


__all__ = ["LabelStudioError", "LabelStudioUnavailable", "LabelStudioConnection", "key_kind", "origin",
           "sdk_error", "iter_project_tasks", "label_studio_alive"]
