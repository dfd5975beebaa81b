"""The cache's files: entry names, the start-up scan, atomic writes, and the thread that writes behind.

``ResponseCache`` (cache.py) decides what is stored, served and evicted; this module knows only the layout:
one ``<key>.json`` per answer in one directory, each written under a ``.tmp-`` name and then renamed, so a
crash never leaves a half entry under a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from llmpod._files import atomic_write
from llmpod.errors import ConfigError

ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.json\Z")  # what the start-up scan indexes; matched from the start
TMP_PREFIX = ".tmp-"
# exactly the temp names ``write_atomically`` makes (key, writer id, clock): start-up removes only these
TMP_NAME = re.compile(r"\.tmp-[0-9a-f]{64}-[0-9]+-[0-9]+\Z")
log = logging.getLogger("llmpod.proxy.cache")
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# what a full, read-only or vanished disk answers a write with: storing pauses rather than failing every answer
DISK_REFUSALS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR})


class ForeignDirectory(ConfigError):
    """The cache directory is not ours to use (another user's, writable by others, not a directory): no retry
    makes it ours. Other ``ConfigError``s of ``check_directory`` (it cannot be made or looked at now) may pass."""


def check_directory(directory: str | os.PathLike[str]) -> None:
    """Make the cache directory 0700 (made, or closed if it is ours); refuse one another user could have planted
    answers in.

    The default lives in a shared /tmp: whoever creates ``/tmp/llm_cache`` first owns what is in it. Raises
    ``ConfigError`` (one line, the fix) for a directory owned by another user or writable by group or others.
    """
    path = os.fspath(directory)
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create cache dir {path}: {exc.strerror} (set CACHE_DIR)") from None
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot use cache dir {path}: {exc.strerror} (set CACHE_DIR)") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ForeignDirectory(f"cache dir {path} is not a directory: remove it or set CACHE_DIR")
    if info.st_uid != os.geteuid():
        raise ForeignDirectory(f"cache dir {path} is owned by uid {info.st_uid}: remove it or set CACHE_DIR")
    if info.st_mode & 0o022:
        raise ForeignDirectory(f"cache dir {path} is writable by others: remove it or set CACHE_DIR")
    if info.st_mode & 0o077:
        # ours, but readable by others: made by an older version (0755, entries 0644) or by hand. Closing the
        # directory hides every entry in it, whatever the entries' own modes.
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            raise ConfigError(f"cache dir {path} is readable by others and chmod 700 failed: {exc.strerror}") from None


class NotOurs(OSError):
    """An entry file another user owns, or that is not a regular file: never served, never deleted."""


@dataclass(slots=True)
class IndexEntry:
    size: int
    created: float
    last_used: float
    hits: int = 0
    layout: Any = None  # a large entry's ``Layout`` (_cache_stream), found on its first hit: later hits read pieces


def index_of(directory: str, names: list[str]) -> tuple[OrderedDict[str, IndexEntry], int]:
    """The index of the entry files among ``names`` (oldest use first), and their total size.

    A stat per entry is most of a start-up with 100k entries, so this loop is kept to the bone: names
    relative to the directory's descriptor, one pattern for the whole name, one ``lstat``.
    """
    found: list[tuple[float, str, int]] = []
    append, is_entry_name, is_file, uid = found.append, ENTRY_NAME.match, stat.S_ISREG, os.geteuid()
    foreign = 0
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
                if info.st_uid != uid:  # planted (or left by a run as another user): not ours to serve or delete
                    foreign += 1
                    continue
                append((info.st_mtime, name[:-5], info.st_size))
    finally:
        os.close(fd)
    if foreign:
        log.warning("cache: %d entries in %s are owned by another user: ignored", foreign, directory)
    found.sort()  # oldest use first = first to evict
    index = OrderedDict((key, IndexEntry(size, mtime, mtime)) for mtime, key, size in found)
    return index, sum(size for _, _, size in found)


def scan(
    directory: str,
    names: list[str],
    index: Callable[[str, list[str]], tuple[OrderedDict[str, IndexEntry], int]] = index_of,
) -> tuple[OrderedDict[str, IndexEntry], int]:
    """``index`` the listed names; nothing when there were none (the directory may not even exist)."""
    if not names:
        return OrderedDict(), 0
    try:
        return index(directory, names)
    except OSError as exc:  # the directory went away meanwhile: what was written since is all there is
        log.warning("cache: could not index %s: %s", directory, exc.strerror)
        return OrderedDict(), 0


def merge_scan(
    scanned: OrderedDict[str, IndexEntry], scanned_bytes: int, gone: Iterable[str], recent: OrderedDict[str, IndexEntry]
) -> tuple[OrderedDict[str, IndexEntry], int]:
    """The start-up scan's index (oldest use first) under what happened since the listing: the ``gone`` keys
    dropped, and the ``recent`` entries (written or served meanwhile) as the most recent uses."""
    for key in gone:
        dropped = scanned.pop(key, None)
        if dropped is not None:
            scanned_bytes -= dropped.size
    for key, entry in recent.items():
        seen = scanned.pop(key, None)
        scanned[key] = entry
        scanned_bytes += entry.size - (seen.size if seen is not None else 0)
    return scanned, scanned_bytes


def list_and_tidy(directory: str) -> list[str]:
    """Every name in the directory; the temp files of our writes that a crash interrupted are removed (never
    served): only names ``write_atomically`` makes, and only files we own. Call it before this process
    starts writing."""
    names = os.listdir(directory)
    uid = os.geteuid()
    for name in names:
        if TMP_NAME.match(name):
            with contextlib.suppress(OSError):
                info = os.stat(f"{directory}/{name}", follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_uid == uid:
                    os.unlink(f"{directory}/{name}")
    return names


def stat_entry(directory: str, key: str) -> IndexEntry | None:
    """The index entry for ``key``'s file, if it is a regular file (a link is not followed)."""
    try:
        info = os.stat(f"{directory}/{key}.json", follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        return None
    return IndexEntry(size=info.st_size, created=info.st_mtime, last_used=info.st_mtime)


class CorruptEntry(Exception):
    """An entry file that is not a JSON object naming its own key; the message says what is wrong."""


def open_entry(directory: str, key: str) -> int:
    """A descriptor of ``key``'s file; a link swapped in is not followed. Raises ``OSError`` (``NotOurs`` for a
    file another user owns or one that is not a regular file)."""
    # non-blocking: opening a FIFO planted under an entry's name would otherwise wait for a writer forever
    fd = os.open(f"{directory}/{key}.json", os.O_RDONLY | NOFOLLOW | NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotOurs(errno.EINVAL, "not a regular file")
        if info.st_uid != os.geteuid():
            raise NotOurs(errno.EPERM, f"owned by uid {info.st_uid}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_all(fd: int) -> bytes:
    """The whole file behind ``fd`` (which stays open), read from its start."""
    parts = []
    offset = 0
    while part := os.pread(fd, 1 << 20, offset):
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


def parse_document(data: bytes, key: str) -> dict[str, Any]:
    """An entry file's bytes, parsed; raises ``CorruptEntry`` unless they are a JSON object naming ``key``."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise CorruptEntry("not valid JSON") from None
    if not isinstance(document, dict) or document.get("key") != key:
        raise CorruptEntry("does not match its name")
    return document


def read_document(directory: str, key: str) -> dict[str, Any]:
    """``key``'s file, parsed. Raises ``OSError`` (``NotOurs``, as ``open_entry``) or ``CorruptEntry``."""
    fd = open_entry(directory, key)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    return parse_document(data, key)


def touch(directory: str, key: str, when: float) -> None:
    """Record a use in the file's mtime (LRU order survives a restart); a link is never followed."""
    os.utime(f"{directory}/{key}.json", (when, when), follow_symlinks=False)


def remove_entry(directory: str, key: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(f"{directory}/{key}.json")


def remove_unindexed(directory: str, indexed: Container[str]) -> int:
    """Remove the entry files whose keys are not in ``indexed``; how many went."""
    removed = 0
    uid = os.geteuid()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if ENTRY_NAME.match(name) and name[:-5] not in indexed:
                with contextlib.suppress(OSError):
                    if os.stat(f"{directory}/{name}", follow_symlinks=False).st_uid != uid:
                        continue  # another user's file is not ours to delete (nor served)
                    os.unlink(f"{directory}/{name}")
                    removed += 1
    return removed


def write_atomically(directory: str, key: str, data: bytes, writer_id: int) -> None:
    """Write ``<key>.json`` whole or not at all; ``writer_id`` keeps concurrent writers' temp names apart. The
    directory is made again if it is gone (``rm -rf`` to clear the cache, a /tmp cleaner), or every answer from
    here on would go unstored until a restart. No fsync: a lost entry is only a future miss."""
    tmp = f"{directory}/{TMP_PREFIX}{key}-{writer_id}-{time.monotonic_ns()}"
    target = f"{directory}/{key}.json"
    try:  # 0600: every prompt and answer of the user's day; only they may read it
        atomic_write(target, data, mode=0o600, fsync=False, tmp=tmp)
    except FileNotFoundError:
        try:
            check_directory(directory)  # made again 0700, and still refused if someone else got there first
        except ConfigError as exc:
            raise PermissionError(errno.EACCES, str(exc)) from None
        atomic_write(target, data, mode=0o600, fsync=False, tmp=tmp)


class EntryWriter(threading.Thread):
    """Writes queued entries in order and reports each result back on the event loop."""

    def __init__(
        self,
        write: Callable[[str, bytes], None],
        loop: asyncio.AbstractEventLoop,
        written: Callable[[str, int], None],
        failed: Callable[[str, OSError], None],
    ) -> None:
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
