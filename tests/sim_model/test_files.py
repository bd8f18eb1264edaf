"""Atomic writes (sim_model.files): readers never see a partial file; failures leave the target alone."""
import os
import stat
import threading

import pytest

from sim_model.files import atomic_write_bytes, atomic_write_text, current_umask


def test_write_creates_folders_and_replaces_whole_files(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "b.json", "first")
    assert p.read_text() == "first"
    atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second"
    assert os.listdir(p.parent) == ["b.json"]  # no temporary left behind


def test_concurrent_readers_see_old_or_new_never_a_part(tmp_path):
    p = tmp_path / "x"
    old, new = b"a" * 200_000, b"b" * 300_000
    atomic_write_bytes(p, old)
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            seen.add(p.read_bytes())

    t = threading.Thread(target=read)
    t.start()
    for i in range(50):
        atomic_write_bytes(p, new if i % 2 == 0 else old)
    stop.set()
    t.join()
    assert seen <= {old, new}


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    p = atomic_write_text(tmp_path / "keep.txt", "kept")
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_text() == "kept" and os.listdir(tmp_path) == ["keep.txt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give_not_mkstemps_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        new = atomic_write_text(tmp_path / "CURRENT", "v0001\n")
        (tmp_path / "existing").write_text("old")
        os.chmod(tmp_path / "existing", 0o600)
        replaced = atomic_write_bytes(tmp_path / "existing", b"new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == mode
    assert stat.S_IMODE(replaced.stat().st_mode) == mode
