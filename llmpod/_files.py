"""Atomic file replacement, the one way files are written whole: state, pid files, the catalog cache, cache entries.

The data goes to a temporary file beside the target, which is then renamed over it, so a reader (or a process
killed mid-write) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import time

__all__ = ["atomic_write"]


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    exact_mode: bool = False,
    fsync: bool = True,
    make_dirs: bool = False,
    tmp: str | None = None,
) -> None:
    """Write ``data`` to ``path`` whole or not at all.

    ``mode`` is the file's mode from its first byte (0600 keeps secrets private; the umask still applies unless
    ``exact_mode``, which sets it as given). ``fsync`` makes the data durable before the rename (a state file must
    survive a power cut; a cache entry need not). ``make_dirs`` creates the folder when it is missing (a cache
    directory removed while the proxy runs). ``tmp`` names the temporary file; by default a unique hidden name
    beside ``path``. A temporary file is never left behind on failure.
    """
    target = os.fspath(path)
    if tmp is None:
        folder, name = os.path.split(target)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        try:
            fd = os.open(tmp, flags, mode)
        except FileNotFoundError:
            if not make_dirs:
                raise
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            fd = os.open(tmp, flags, mode)
        try:
            if exact_mode:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
