"""Atomic file writes: a reader sees the old content or the new one, never a part of either.

Every file that another process may read while it is rewritten (a version's ``metrics.json``, the
registry's ``CURRENT`` and class map, the benchmark results, the image cache's manifest and images,
the webhook's annotation counter) is written through :func:`atomic_write_bytes`: the data goes to a
unique temporary file in the same folder, is flushed and ``fsync``-ed, then ``os.replace``-d over the
target (atomic on POSIX), and the folder is ``fsync``-ed so that the rename survives a crash.

The new file gets the permissions a plain ``open(path, "w")`` would give a new file, ``0o666 & ~umask``
(e.g. ``0o644`` under the usual umask ``0o022``), not ``tempfile.mkstemp``'s ``0o600``: the files are
shared through the models volume by processes that may run as other users (backend, retrain, cron).
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def _proc_umask() -> int | None:
    """The umask from ``/proc/self/status`` (Linux >= 4.7), read without changing it; None if unavailable."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """The umask when this module was imported: set-and-restore, once, as early as possible.

    ``os.umask`` can only be read by setting it; doing that later, in a process with threads, could let
    another thread create a file under the temporary value (``0o077`` here, the safe direction). Used only
    where /proc does not tell the umask.
    """
    old = os.umask(0o077)  # the most restrictive value while the real one is out
    os.umask(old)
    return old


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process's umask now (Linux: from /proc, so later ``os.umask`` calls are seen; elsewhere the
    umask at import of this module). Never changes it."""
    umask = _proc_umask()
    return _UMASK_AT_IMPORT if umask is None else umask


def _chmod_like_open(fd: int) -> None:
    """Give the temporary file ``0o666 & ~umask`` instead of mkstemp's ``0o600``.

    Filesystems without Unix modes (vfat, some network mounts) refuse ``fchmod`` (EPERM, ENOTSUP); their
    modes come from the mount options, so the write goes on without it.
    """
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (module docstring); missing parent folders are created.

    Args:
        path: the target file.
        data: its new content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. The file's mode is ``0o666 & ~umask`` (module docstring),
        also when it replaces a file with another mode (except on a filesystem without Unix modes).

    Raises:
        OSError: the folder cannot be written (the target is then unchanged and no temporary is left).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _chmod_like_open(f.fileno())
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


__all__ = ["atomic_write_bytes", "atomic_write_text", "current_umask"]
