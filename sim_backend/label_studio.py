"""Talking to Label Studio's API with label-studio-sdk: the client, its errors, the task listing.

The training commands (export, pushing predictions) reach Label Studio through here; the backend's
image loading sends the same key (:mod:`sim_backend.images`).
"""
from __future__ import annotations

from typing import Iterator

import httpx
import requests
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError


class LabelStudioError(RuntimeError):
    """Label Studio refused a request (unknown project, bad API key, unusable labeling config, …)."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio does not answer (connection refused or reset, timeout, HTTP 5xx)."""


def connect(url: str, api_key: str, timeout: float = 30.0) -> LabelStudio:
    """A ``label_studio_sdk.LabelStudio`` client (no network call yet).

    Args:
        url: Label Studio's base URL, e.g. ``http://localhost:8080``.
        api_key: the API key.
        timeout: seconds per request.

    Raises:
        LabelStudioError: URL or API key missing.
    """
    if not url:
        raise LabelStudioError("no Label Studio URL: pass --url or set LABEL_STUDIO_URL")
    if not api_key:
        raise LabelStudioError("no Label Studio API key: pass --api-key or set LABEL_STUDIO_API_KEY")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout, max_retries=0)


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


__all__ = ["LabelStudioError", "LabelStudioUnavailable", "connect", "sdk_error", "iter_project_tasks",
           "label_studio_alive"]
