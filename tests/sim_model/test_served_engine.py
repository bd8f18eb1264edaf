"""Which engine serves a project (sim_model.engines.served_engine), also when its current version is broken."""
from __future__ import annotations

import json

import pytest

from sim_model.engines import served_engine
from sim_model.engines.grabcut import GrabCutBoxToMask
from sim_model.registry import ModelRegistry, ModelVersionError


def _broken_current_version(tmp_path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path)
    with reg.create_version(4) as (version, vdir):
        (vdir / "model.pth").write_bytes(b"not a checkpoint")
        (vdir / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: CondInst\n")
        (vdir / "classes.json").write_text(json.dumps({"labels": ["cat"]}))
        (vdir / "metrics.json").write_text("{}")
    reg.set_current(4, version)
    return reg


def test_without_a_version_the_cold_start_serves(tmp_path):
    assert isinstance(served_engine(ModelRegistry(tmp_path), 4), GrabCutBoxToMask)


def test_a_broken_current_version_raises_or_falls_back_to_the_cold_start(tmp_path):
    reg = _broken_current_version(tmp_path)
    with pytest.raises(ModelVersionError):
        served_engine(reg, 4)
    reported = []
    engine = served_engine(reg, 4, on_error=reported.append)
    assert isinstance(engine, GrabCutBoxToMask) and len(reported) == 1
    assert isinstance(reported[0], ModelVersionError)
