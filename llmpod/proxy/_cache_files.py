"""The cache's files: entry names, the start-up scan, atomic writes, and the thread that writes behind.

``ResponseCache`` (cache.py) decides what is stored, served and evicted; this module knows only the layout:
one ``<key>.json`` per answer in one directory, each written under a ``.tmp-`` name and then renamed, so a
crash never leaves a half entry under a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from llmpod._files import atomic_write

ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.json\Z")  # what the start-up scan indexes; matched from the start
TMP_PREFIX = ".tmp-"


@dataclass(slots=True)
class IndexEntry:
    size: int
    created: float
    last_used: float
    hits: int = 0


def index_of(directory: str, names: list[str]) -> tuple[OrderedDict[str, IndexEntry], int]:
    """The index of the entry files among ``names`` (oldest use first), and their total size.

    A stat per entry is most of a start-up with 100k entries, so this loop is kept to the bone: names
    relative to the directory's descriptor, one pattern for the whole name, one ``lstat``.
    """
    found: list[tuple[float, str, int]] = []
    append, is_entry_name, is_file = found.append, ENTRY_NAME.match, stat.S_ISREG
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for name in names:
            if is_entry_name(name) is None:
                continue
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            # not a link: in a shared /tmp one may point at anyone's file; nor a directory
            if is_file(info.st_mode):
                append((info.st_mtime, name[:-5], info.st_size))
    finally:
        os.close(fd)
    found.sort()  # oldest use first = first to evict
    index = OrderedDict((key, IndexEntry(size, mtime, mtime)) for mtime, key, size in found)
    return index, sum(size for _, _, size in found)


def write_atomically(directory: str, key: str, data: bytes, writer_id: int) -> None:
    """Write ``<key>.json`` whole or not at all; ``writer_id`` keeps concurrent writers' temp names apart. The
    directory is made again if it is gone (``rm -rf`` to clear the cache, a /tmp cleaner), or every answer from
    here on would go unstored until a restart. No fsync: a lost entry is only a future miss."""
    tmp = f"{directory}/{TMP_PREFIX}{key}-{writer_id}-{time.monotonic_ns()}"
    atomic_write(f"{directory}/{key}.json", data, mode=0o644, fsync=False, make_dirs=True, tmp=tmp)


class EntryWriter(threading.Thread):
    """Writes queued entries in order and reports each result back on the event loop."""

    def __init__(self, write: Callable[[str, bytes], None], loop: asyncio.AbstractEventLoop,
                 written: Callable[[str, int], None], failed: Callable[[str, OSError], None]) -> None:
        super().__init__(name="llmpod-cache-writer", daemon=True)
        self.write, self.loop, self.written, self.failed = write, loop, written, failed
        self.queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()

    def submit(self, key: str, data: bytes) -> None:
        self.queue.put((key, data))

    def stop(self, timeout: float) -> None:
        self.queue.put(None)
        self.join(timeout)

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            key, data = item
            try:
                self.write(key, data)
            except OSError as exc:
                self._report(self.failed, key, exc)
            else:
                self._report(self.written, key, len(data))

    def _report(self, callback: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown: the file is written anyway
            self.loop.call_soon_threadsafe(callback, *args)
