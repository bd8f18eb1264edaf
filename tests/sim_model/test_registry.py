"""Model registry: versions written under a temporary name, atomic CURRENT switch, quality gate, class map."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from sim_model.registry import (FileLock, LockHeld, ModelRegistry, ProjectLock, adopt_lock, engine_variants,
                                sim_model_version)


def _write_version(reg: ModelRegistry, project, metrics: dict | None = None) -> str:
    with reg.create_version(project) as (version, vdir):
        (vdir / "model.pth").write_bytes(b"weights of " + version.encode())
        (vdir / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: CondInst\n")
        (vdir / "classes.json").write_text(json.dumps({"labels": ["cat", "dog"]}))
        (vdir / "metrics.json").write_text(json.dumps(metrics or {}))
    return version


def test_versions_are_numbered_and_listed_with_metrics(tmp_path):
    reg = ModelRegistry(tmp_path)
    assert reg.current_version(3) is None and reg.list_versions(3) == []
    v1 = _write_version(reg, 3, {"val": {"mIoU": 0.5, "n_masks": 4}})
    v2 = _write_version(reg, 3, {"val": {"mIoU": 0.6, "n_masks": 4}})
    assert (v1, v2) == ("v0001", "v0002")
    infos = reg.list_versions(3)
    assert [i.name for i in infos] == ["v0001", "v0002"]
    assert [i.metrics["val"]["mIoU"] for i in infos] == [0.5, 0.6]
    assert not any(i.current for i in infos)  # writing a version does not serve it
    reg.set_current(3, v2)
    assert [i.current for i in reg.list_versions(3)] == [False, True]


def test_half_written_version_is_never_visible_nor_current(tmp_path):
    reg = ModelRegistry(tmp_path)
    v1 = _write_version(reg, 1, {})
    reg.set_current(1, v1)
    with pytest.raises(RuntimeError, match="crash"):
        with reg.create_version(1) as (version, vdir):
            (vdir / "model.pth").write_bytes(b"partial")
            assert reg.version_names(1) == ["v0001"]  # the temporary dir is not a version
            raise RuntimeError("crash while writing")
    assert reg.version_names(1) == ["v0001"]
    assert not any(p.name.startswith(".v0002") for p in reg.project_dir(1).iterdir())  # cleaned up
    # incomplete: a block that forgets a required file does not create the version either
    with pytest.raises(FileNotFoundError, match="classes.json"):
        with reg.create_version(1) as (version, vdir):
            (vdir / "model.pth").write_bytes(b"w")
            (vdir / "config.yaml").write_text("x")
    assert reg.version_names(1) == ["v0001"]
    # a CURRENT pointing at an incomplete directory is not served; set_current refuses it
    (reg.project_dir(1) / "v0009").mkdir()
    (reg.project_dir(1) / "v0009" / "model.pth").write_bytes(b"w")
    with pytest.raises(FileNotFoundError):
        reg.set_current(1, "v0009")
    (reg.project_dir(1) / "CURRENT").write_text("v0009\n")
    assert reg.current_version(1) is None


def _crashing_writer(root: str, ready):
    reg = ModelRegistry(root)
    with reg.create_version(5) as (version, vdir):
        (vdir / "model.pth").write_bytes(b"w" * 1000)
        ready.set()
        time.sleep(60)


def test_killed_writer_leaves_no_version_and_a_later_run_cleans_up(tmp_path):
    reg = ModelRegistry(tmp_path)
    ready = mp.Event()
    p = mp.get_context("fork").Process(target=_crashing_writer, args=(str(tmp_path), ready))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    leftovers = [d.name for d in reg.project_dir(5).iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".v0001.tmp-")
    assert reg.version_names(5) == [] and reg.current_version(5) is None
    assert reg.next_version_name(5) == "v0002"  # a leftover's number is never reused
    old = time.time() - 7200
    os.utime(reg.project_dir(5) / leftovers[0], (old, old))
    assert reg.remove_stale_temporaries(5) == leftovers


def test_current_switch_is_atomic_for_concurrent_readers(tmp_path):
    reg = ModelRegistry(tmp_path)
    versions = [_write_version(reg, 2, {}) for _ in range(2)]
    reg.set_current(2, versions[0])
    seen = set()

    def flip():
        for i in range(300):
            reg.set_current(2, versions[i % 2])

    import threading

    t = threading.Thread(target=flip)
    t.start()
    while t.is_alive():
        seen.add(reg.current_version(2))
    t.join()
    assert seen <= set(versions)  # never None, never a torn name
    assert not [p for p in reg.project_dir(2).iterdir() if p.name.endswith(".tmp")]


def test_publish_gate_with_tolerance(tmp_path):
    reg = ModelRegistry(tmp_path)
    v1 = _write_version(reg, 7, {"val": {"mIoU": 0.70, "n_masks": 10}})
    d = reg.publish(7, v1, reg.read_metrics(7, v1), tolerance=0.02)
    assert d.published and reg.current_version(7) == v1 and d.previous is None

    # slightly worse, within tolerance: published
    v2 = _write_version(reg, 7, {"val": {"mIoU": 0.69, "n_masks": 10}})
    d = reg.publish(7, v2, reg.read_metrics(7, v2), tolerance=0.02)
    assert d.published and reg.current_version(7) == v2
    assert d.baseline_value == pytest.approx(0.70) and d.new_value == pytest.approx(0.69)

    # worse by more than the tolerance against the baseline measured in the same run: kept, not served
    m3 = {"val": {"mIoU": 0.60, "n_masks": 10}, "baseline": {"version": v2, "mIoU": 0.66, "n_masks": 10}}
    v3 = _write_version(reg, 7, m3)
    d = reg.publish(7, v3, m3, tolerance=0.02)
    assert not d.published and reg.current_version(7) == v2
    assert "worse" in d.reason and "0.0600" in d.reason
    assert v3 in reg.version_names(7)  # kept on disk
    assert reg.read_metrics(7, v3)["publish"]["published"] is False  # the reason is stored with it
    # the same drop passes with a larger tolerance
    d = reg.publish(7, v3, m3, tolerance=0.1)
    assert d.published and reg.current_version(7) == v3

    with pytest.raises(ValueError):
        reg.publish(7, v3, m3, tolerance=-1)


def test_publish_without_validation_polygons(tmp_path):
    reg = ModelRegistry(tmp_path)
    v1 = _write_version(reg, 8, {})
    d = reg.publish(8, v1, {}, 0.02)
    assert d.published and "first version" in d.reason
    v2 = _write_version(reg, 8, {})
    d = reg.publish(8, v2, {"val": {"n_masks": 0}}, 0.02)
    assert d.published and reg.current_version(8) == v2  # neither checked: the newer one serves
    v3 = _write_version(reg, 8, {"val": {"mIoU": 0.7, "n_masks": 3}})
    assert reg.publish(8, v3, reg.read_metrics(8, v3), 0.02).published
    v4 = _write_version(reg, 8, {})
    d = reg.publish(8, v4, {}, 0.02)
    assert not d.published and reg.current_version(8) == v3  # an unchecked model never replaces a checked one
    assert "no validation polygons" in d.reason


def test_class_map_is_stable_and_grows(tmp_path):
    reg = ModelRegistry(tmp_path)
    assert reg.load_class_map(4) == []
    assert reg.update_class_map(4, ["dog", "cat", "dog"]) == ["cat", "dog"]
    # new labels get new ids after the old ones, in sorted order; old ids never move
    assert reg.update_class_map(4, ["zebra", "cat", "ant"]) == ["cat", "dog", "ant", "zebra"]
    # a label that disappeared keeps its id
    assert reg.update_class_map(4, ["ant"]) == ["cat", "dog", "ant", "zebra"]
    assert ModelRegistry(tmp_path).load_class_map(4) == ["cat", "dog", "ant", "zebra"]  # persisted
    assert json.loads(reg.class_map_path(4).read_text())["labels"][3] == "zebra"


def test_project_lock_is_exclusive_and_adoptable(tmp_path):
    lock = ProjectLock(tmp_path, 9).acquire()
    assert lock.is_held() and ProjectLock(tmp_path, 9).is_held()
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        ProjectLock(tmp_path, 9).acquire()
    assert not ProjectLock(tmp_path, 10).is_held()  # one lock per project
    adopted = adopt_lock(lock.fd, tmp_path, 9)  # the holder's own descriptor, as handed to a retrain
    assert adopted.fd == lock.fd
    with pytest.raises(LockHeld, match="is not"):
        adopt_lock(os.open(tmp_path, os.O_RDONLY), tmp_path, 9)  # another file
    lock.release()
    assert not ProjectLock(tmp_path, 9).is_held()
    with ProjectLock(tmp_path, 9):
        assert ProjectLock(tmp_path, 9).is_held()
    assert not ProjectLock(tmp_path, 9).is_held()


def test_a_failed_holder_record_neither_keeps_the_lock_nor_leaks_its_descriptor(tmp_path, monkeypatch):
    def disk_full(self, pid):
        raise OSError(28, "No space left on device")

    fds_before = set(os.listdir("/proc/self/fd"))
    with monkeypatch.context() as m:
        m.setattr(FileLock, "write_holder", disk_full)
        lock = ProjectLock(tmp_path, 5)
        with pytest.raises(OSError, match="No space"):
            lock.acquire()
    assert lock.fd is None and set(os.listdir("/proc/self/fd")) == fds_before
    assert not ProjectLock(tmp_path, 5).is_held()
    ProjectLock(tmp_path, 5).acquire().release()  # a later retrain can take it


def test_metrics_are_written_as_plain_json(tmp_path):
    np = pytest.importorskip("numpy")
    reg = ModelRegistry(tmp_path)
    v = _write_version(reg, 2, {})
    reg.write_metrics(2, v, {"val": {"mIoU": np.float32(0.5), "n_masks": np.int64(3)}, "ious": np.array([0.25, 1.0]),
                             "dir": tmp_path, "shape": (2, 3)})
    assert reg.read_metrics(2, v) == {"val": {"mIoU": 0.5, "n_masks": 3}, "ious": [0.25, 1.0], "dir": str(tmp_path),
                                      "shape": [2, 3]}


def test_the_gate_serves_the_best_of_the_new_version_the_served_one_and_grabcut(tmp_path):
    reg = ModelRegistry(tmp_path)
    v1 = _write_version(reg, 5)
    # first version, measured against GrabCut only: the model must be as good as it
    d = reg.publish(5, v1, {"val": {"mIoU": 0.65, "n_masks": 6}, "grabcut": {"mIoU": 0.72, "n_masks": 6}}, 0.02)
    assert not d.published and "loses to GrabCut" in d.reason and reg.current_version(5) is None
    # within the tolerance of GrabCut: noise on few masks, served
    v1b = _write_version(reg, 5)
    assert reg.publish(5, v1b, {"val": {"mIoU": 0.71, "n_masks": 6}, "grabcut": {"mIoU": 0.72, "n_masks": 6}},
                       0.02).published
    reg.clear_current(5)
    v2 = _write_version(reg, 5)
    d = reg.publish(5, v2, {"val": {"mIoU": 0.80, "n_masks": 6}, "baseline": {"mIoU": 0.72, "n_masks": 6},
                            "grabcut": {"mIoU": 0.72, "n_masks": 6}}, 0.02)
    assert d.published and reg.current_version(5) == v2 and not d.cold_start
    # a newer version within the tolerance of the served one but below GrabCut is not served, and since
    # GrabCut now also beats the served version (on more masks), GrabCut serves again
    v3 = _write_version(reg, 5)
    d = reg.publish(5, v3, {"val": {"mIoU": 0.74, "n_masks": 20}, "baseline": {"mIoU": 0.75, "n_masks": 20},
                            "grabcut": {"mIoU": 0.80, "n_masks": 20}}, 0.02)
    assert not d.published and d.cold_start and reg.current_version(5) is None
    assert reg.read_metrics(5, v3)["publish"]["cold_start"] is True


def test_a_version_that_serves_colour_steps_says_so_in_its_model_version(tmp_path):
    reg = ModelRegistry(tmp_path)
    v1 = _write_version(reg, 6, {"engine": {"refine": True}})  # written before the vote existed
    v2 = _write_version(reg, 6, {"engine": {"refine": False}})
    v3 = _write_version(reg, 6, {})
    v4 = _write_version(reg, 6, {"engine": {"refine": False, "vote": True}})
    v5 = _write_version(reg, 6, {"engine": {"vote": True, "refine": True}})
    v6 = _write_version(reg, 6, {"engine": {"vote": "yes", "crf": True}})  # only true steps that exist count
    assert [reg.model_version(6, v) for v in (v1, v2, v3, v4, v5, v6)] == [
        "sim-v0001+refine", "sim-v0002", "sim-v0003", "sim-v0004+vote", "sim-v0005+refine+vote", "sim-v0006"]
    with pytest.raises(ValueError, match="unknown engine steps"):
        sim_model_version("v0001", ["crf"])
    # the gate's variants: the map, then each combination of steps, named as model_version names them
    variants = engine_variants()
    assert variants == {"map": (), "refine": ("refine",), "vote": ("vote",), "refine+vote": ("refine", "vote")}
    assert [sim_model_version("v0001", s) for s in variants.values()] == [
        "sim-v0001" + ("" if n == "map" else "+" + n) for n in variants]
