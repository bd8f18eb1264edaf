"""Box→mask engines, and the one rule of which engine serves a project.

- :mod:`.shape_prior`: the filled box and the inscribed ellipse (no image content);
- :mod:`.grabcut`: the cold start, served before a project has a published model version;
- :mod:`.sim`: a trained SIM model version.

The rule (:func:`served_engine`): a project's current registry version when it has one, else the
cold-start engine. The backend adds caching and hot reload around the same two builders
(:func:`cold_start_engine`, :func:`version_engine`); the retrain compares a new version against it.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from sim_model.box_to_mask import BoxToMask
from sim_model.engines.grabcut import GrabCutBoxToMask
from sim_model.registry import ModelRegistry, ModelVersionError, served_steps, sim_model_version


def cold_start_engine() -> BoxToMask:
    """The engine served before any model version exists: :class:`GrabCutBoxToMask` with its defaults."""
    return GrabCutBoxToMask()


def version_engine(version_dir: str | os.PathLike, device: str = "cpu", version: str | None = None,
                   steps: Iterable[str] | None = None) -> BoxToMask:
    """The SIM engine of one registry version directory.

    Args:
        version_dir: the version's directory.
        device: torch device.
        version: the version's name when the directory does not bear it yet (a version being written);
            default the directory's name. The engine reports :func:`sim_model.registry.sim_model_version` of it.
        steps: the colour steps on top of the map (:data:`sim_model.registry.ENGINE_STEPS`: "refine", "vote");
            None = what the version's gate chose (:func:`sim_model.registry.served_steps`).

    Raises:
        sim_model.registry.ModelVersionError: the version cannot be loaded.
        ValueError: an unknown step.
    """
    # torch and detectron2 load only when a trained version is served (a cold-start backend starts fast)
    from sim_model.engines.sim import SIMBoxToMask

    steps = served_steps(version_dir) if steps is None else tuple(steps)
    name = sim_model_version(version or os.path.basename(os.path.normpath(version_dir)), steps)  # checks steps
    engine = SIMBoxToMask.from_version_dir(version_dir, device=device, refine="refine" in steps, vote="vote" in steps)
    engine.model_version = name
    return engine


def served_engine(registry: ModelRegistry, project: int | str, device: str = "cpu",
                  on_error: Callable[[ModelVersionError], None] | None = None) -> BoxToMask:
    """The engine that serves ``project`` now: its current version, else the cold start.

    Args:
        registry, project: where the current version is.
        device: torch device.
        on_error: when given, a current version that cannot be loaded is reported to it and the cold start
            returned instead (what the backend serves then); when None, the error is raised.

    Raises:
        sim_model.registry.ModelVersionError: the current version cannot be loaded (``on_error`` None).
    """
    version = registry.current_version(project)
    if version is None:
        return cold_start_engine()
    try:
        return version_engine(registry.version_dir(project, version), device)
    except ModelVersionError as e:
        if on_error is None:
            raise
        on_error(e)
        return cold_start_engine()


__all__ = ["cold_start_engine", "version_engine", "served_engine"]
