"""The engine of each project, cached per worker and hot-reloaded when the served version changes.

Which engine serves is :mod:`sim_model.engines`' rule (the current registry version, else the cold
start); :class:`EngineProvider` adds the caching around it: it looks at the registry's ``CURRENT``
pointer on every call (one small file read) and switches engines when it changes. The registry only
ever points ``CURRENT`` at a complete version directory, so a half-written version is never loaded. If
a version fails to load, the error is logged and the cold-start engine serves until a new version is
published (a failed version is retried after :data:`RETRY_FAILED_LOAD_S`).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from sim_model.box_to_mask import BoxToMask
from sim_model.engines import cold_start_engine, version_engine
from sim_model.registry import ModelRegistry

from .settings import Settings

log = logging.getLogger(__name__)

#: Seconds before a version that failed to load is tried again.
RETRY_FAILED_LOAD_S = 60.0


class EngineProvider:
    """Serve one :class:`BoxToMask` per Label Studio project.

    Args:
        settings: ``model_dir`` is the registry root.
        fallback_factory: builds the engine served without a (loadable) model version; default
            :func:`sim_model.engines.cold_start_engine`. Built once, lazily.
        sim_loader: builds an engine from a version directory; default
            :func:`sim_model.engines.version_engine` on ``settings.device``.

    Thread-safe. ``project`` arguments may be None (no project known: the fallback serves).
    """

    def __init__(self, settings: Settings, fallback_factory: Callable[[], BoxToMask] | None = None,
                 sim_loader: Callable[..., BoxToMask] | None = None):
        self.settings = settings
        self.registry = ModelRegistry(settings.model_dir)
        self._fallback_factory = fallback_factory or cold_start_engine
        self._sim_loader = sim_loader or (lambda vdir: version_engine(vdir, settings.device))
        self._fallback: BoxToMask | None = None
        self._engines: dict[str, tuple[str, BoxToMask]] = {}   # project -> (version, engine)
        self._failed: dict[tuple[str, str], float] = {}         # (project, version) -> time of failure
        self._lock = threading.RLock()                          # guards the dicts and the fallback
        self._project_locks: dict[str, threading.Lock] = {}     # one load at a time per project

    def fallback(self) -> BoxToMask:
        """The cold-start engine (GrabCut), built on first use."""
        with self._lock:
            if self._fallback is None:
                self._fallback = self._fallback_factory()
                log.info("cold-start engine ready: %s", self._fallback.model_version)
            return self._fallback

    def current_version(self, project) -> str | None:
        """The registry's current version of ``project`` (None without project or version)."""
        if project is None:
            return None
        return self.registry.current_version(project)

    def get(self, project) -> BoxToMask:
        """The engine to use now for ``project``; loads a newly published SIM version on first use.

        Never raises for a missing or broken model: it logs and returns the fallback engine.
        """
        version = self.current_version(project)
        if version is None:
            return self.fallback()
        key = str(project)
        with self._lock:
            cached = self._engines.get(key)
            if cached is not None and cached[0] == version:
                return cached[1]
            project_lock = self._project_locks.setdefault(key, threading.Lock())
        fallback = self.fallback()
        with project_lock:  # other projects keep being served while this one loads
            cached = self._engines.get(key)
            if cached is not None and cached[0] == version:
                return cached[1]
            failed_at = self._failed.get((key, version))
            if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_LOAD_S:
                return fallback
            vdir = self.registry.version_dir(project, version)
            t0 = time.monotonic()
            try:
                engine = self._sim_loader(vdir)
            except Exception:  # ImportError (module not there yet), a bad checkpoint, …
                log.exception("project %s: cannot load model version %s from %s; serving %s",
                              key, version, vdir, fallback.model_version)
                with self._lock:
                    self._failed[(key, version)] = time.monotonic()
                return fallback
            expected = self.registry.model_version(project, version)
            if getattr(engine, "model_version", None) != expected:
                # /setup answered `expected` before the load; Label Studio needs one stable string
                log.warning("project %s: engine reports model_version %r, serving it as %r",
                            key, getattr(engine, "model_version", None), expected)
                engine.model_version = expected
            log.info("project %s: serving %s (loaded in %.1f s)", key, engine.model_version, time.monotonic() - t0)
            with self._lock:
                self._engines[key] = (version, engine)
                self._failed.pop((key, version), None)
            return engine

    def model_version(self, project) -> str:
        """The ``model_version`` that predictions for ``project`` carry now, without loading a model.

        A published version that has not been loaded yet is reported as
        :meth:`~sim_model.registry.ModelRegistry.model_version`; a version that failed to load reports the
        fallback's version.
        """
        version = self.current_version(project)
        if version is None:
            return self.fallback().model_version
        key = str(project)
        with self._lock:
            cached = self._engines.get(key)
            if cached is not None and cached[0] == version:
                return cached[1].model_version
            if (key, version) in self._failed:
                return self.fallback().model_version
        return self.registry.model_version(project, version)

    def preload(self, project) -> None:
        """Load the current engine of ``project`` in a background thread (used by /setup)."""
        threading.Thread(target=self.get, args=(project,), daemon=True, name=f"preload-{project}").start()

    def list_versions(self, project) -> list[str]:
        """The fallback's model_version, then the sorted model_version strings of the complete registry
        versions of ``project`` (of every project when None: Label Studio 1.23 asks without one)."""
        projects = [project] if project is not None else self.registry.projects()
        names = {self.registry.model_version(p, n) for p in projects for n in self.registry.version_names(p)}
        return [self.fallback().model_version] + sorted(names)
