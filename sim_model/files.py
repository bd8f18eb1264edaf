"""Atomic file writes: a reader sees the old content or the new one, never a part of either.

Every file that another process may read while it is rewritten (a version's ``metrics.json``, the
registry's ``CURRENT`` and class map, the benchmark results, the image cache's manifest and images,
the webhook's annotation counter) is written through :func:`atomic_write_bytes`: the data goes to a
unique temporary file in the same folder, is flushed and ``fsync``-ed, then ``os.replace``-d over the
target (atomic on POSIX), and the folder is ``fsync``-ed so that the rename survives a crash.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (module docstring); missing parent folders are created.

    Args:
        path: the target file.
        data: its new content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the folder cannot be written (the target is then unchanged and no temporary is left).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder that cannot be opened for reading
        return path
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


__all__ = ["atomic_write_bytes", "atomic_write_text"]
