"""The on-disk response cache: one JSON file per answer, named by its key.

* The key (keys.py) is the SHA-256 of a canonical JSON of the endpoint and the request as forwarded.
* The file layer is ``_cache_files``: a crash never leaves a half entry under a key, and a file that does not
  parse or does not match its name is deleted and counted (the request is a miss).
* What an entry holds (``CacheEntry``) and what a hit serves (``CachedAnswer``) are ``_cache_entries``.
* The index (key -> size and times, never bodies) lives in memory, is rebuilt from a directory scan at
  start (``stat`` only, no file is read), and evicts least-recently-used entries past either limit. The
  proxy stats on a thread while it already serves (``load_behind``): 100k stats take most of a second.
* A full or read-only disk stops storing (logged once, retried after a pause) and never stops serving.
* The proxy writes behind: ``start_writer`` gives the cache one long-lived thread that writes entries while
  the loop serves the next request (on this VM a lone file write costs ~0.5 ms, three times a write in a
  burst, and it delayed the next request by that much). Until its file exists an entry is served from
  memory; the index only learns of it once it is on disk. Without a writer (unit use) ``put`` writes at once.
* Recently served answers stay parsed in memory, within ``HOT_BYTES`` of file size (reading and parsing the
  file was a third of a hit's time). A hit still touches the file: that records the use for LRU, and a file
  deleted behind the proxy's back (``rm`` to clear the cache) stops being served at once.
* A large answer (over ``LARGE_BYTES`` of file) is never rendered whole for a client: ``get`` returns a
  ``StoredAnswer`` (_cache_stream) that reads and sends it a piece at a time from its file, so a client that stops
  reading holds one piece, not a copy of the answer. Until its file exists, one parsed copy serves every client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from llmpod.errors import ConfigError
from llmpod.proxy import _cache_files as files
from llmpod.proxy._cache_entries import FORMAT_VERSION as FORMAT_VERSION  # re-exported: the file format
from llmpod.proxy._cache_entries import CachedAnswer as CachedAnswer
from llmpod.proxy._cache_entries import CacheEntry as CacheEntry
from llmpod.proxy._cache_entries import answer_from
from llmpod.proxy._cache_files import TMP_PREFIX as TMP_PREFIX  # re-exported: what a crash may leave
from llmpod.proxy._cache_files import EntryWriter, IndexEntry, index_of
from llmpod.proxy._cache_stream import StoredAnswer, open_stored
from llmpod.proxy.keys import KEY_PATTERN
from llmpod.proxy.keys import NON_KEY_FIELDS as NON_KEY_FIELDS  # re-exported: the cache's public names
from llmpod.proxy.keys import UnkeyableRequest as UnkeyableRequest
from llmpod.proxy.keys import cache_key as cache_key

log = logging.getLogger("llmpod.proxy.cache")
T = TypeVar("T")

RETRY_STORE_AFTER = 60.0  # seconds before trying to write again after a full or read-only disk
HOT_BYTES = 8 * 1024 * 1024  # file bytes of answers kept parsed in memory (a few times that in RSS)
LARGE_BYTES = HOT_BYTES // 16  # an entry file larger than this is never kept hot, and is served from its file


class ResponseCache:
    """LRU-bounded directory of cached answers. Every method runs on the event loop."""

    def __init__(self, directory: Path, max_entries: int, max_bytes: int) -> None:
        self.directory = directory
        self._dir = str(directory)
        self._pid = os.getpid()  # the writer id: concurrent proxies on one directory keep their temp names apart
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._index: OrderedDict[str, IndexEntry] = OrderedDict()
        self.total_bytes = 0
        self.evictions = 0
        self.corrupt_discarded = 0
        self.foreign_skipped = 0  # entry files another user owns, or not regular files: not served, kept
        self._refused = False  # the directory is not ours (``check_directory``): nothing in it is read
        self.store_errors = 0
        self.stores = 0
        self.store_disabled_reason: str | None = None
        self._store_retry_at = 0.0
        self._writer: EntryWriter | None = None
        self._pending: dict[str, bytes] = {}  # written by the writer thread, not yet on disk
        self._pending_answers: dict[str, CachedAnswer] = {}  # large pending ones, parsed once for every client
        self._discard: set[str] = set()  # pending entries deleted before their write finished
        self._hot: OrderedDict[str, tuple[CachedAnswer, int]] = OrderedDict()  # parsed, with file size; LRU first
        self._hot_bytes = 0
        self._loading = False  # the start-up scan is running (``load_behind``)
        self._gone_while_loading: set[str] = set()  # dropped meanwhile: not to be taken from the scan
        self._cleared_while_loading = False

    # ----------------------------------------------------------------- start-up
    def load(self) -> None:
        """Create the directory if needed and rebuild the index from what is on disk, before returning."""
        # this module's ``index_of``, looked up at each call: tests stand in for it
        self._merge_scanned(*files.scan(self._dir, self._begin_load(), index_of))

    def load_behind(self) -> asyncio.Task[None]:
        """``load``, with the stat of every entry done on a thread while the proxy already serves.

        The directory is listed (and crash leftovers removed) before this returns; a request for an entry not
        yet indexed looks for its file. Deletes, writes and hits made meanwhile win over what the scan saw.
        """
        names = self._begin_load()
        return asyncio.get_running_loop().create_task(self._scan_behind(names), name="llmpod-cache-load")

    async def _scan_behind(self, names: list[str]) -> None:
        started = time.perf_counter()
        self._merge_scanned(*await asyncio.to_thread(files.scan, self._dir, names, index_of))
        log.info(
            "cache index loaded: %d entries, %d bytes in %.2f s",
            len(self._index),
            self.total_bytes,
            time.perf_counter() - started,
        )

    def _begin_load(self) -> list[str]:
        """Empty the index and list the directory (every name), removing the temp files of interrupted writes
        (before ours start); from here until ``_merge_scanned`` the cache is loading."""
        self._loading = True
        self._index.clear()
        self._hot.clear()
        self._hot_bytes = 0
        self.total_bytes = 0
        try:  # made 0700; another user's (or a world-writable) directory is refused: they would plant answers
            files.check_directory(self._dir)
        except files.ForeignDirectory as exc:
            self._disable_store(str(exc))
            self._refused = True
            return []
        except ConfigError as exc:  # cannot be made now (a parent missing): storing is retried after the pause
            self._disable_store(str(exc))
            self._refused = False
            return []
        self._refused = False
        try:
            names = files.list_and_tidy(self._dir)
        except OSError as exc:  # unreadable: nothing on it can be found, but answers may still be stored
            log.error("cache: cannot list %s: %s; starting with an empty index", self.directory, exc.strerror)
            names = []
        if not os.access(self.directory, os.W_OK):
            self._disable_store(f"{self.directory} is not writable")
        return names

    def _merge_scanned(self, scanned: OrderedDict[str, IndexEntry], scanned_bytes: int) -> None:
        """Take the scan's index (oldest use first) under what happened since the listing."""
        if self._cleared_while_loading:  # what the scan found predates the clear, which removed its files
            scanned, scanned_bytes = OrderedDict(), 0
        self._index, self.total_bytes = files.merge_scan(scanned, scanned_bytes, self._gone_while_loading, self._index)
        self._loading = self._cleared_while_loading = False
        self._gone_while_loading.clear()
        self._evict()

    @property
    def loading(self) -> bool:
        """True while the start-up scan runs: the index does not know every entry on disk yet."""
        return self._loading

    # ----------------------------------------------------------------- reads
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def path_for(self, key: str) -> Path:
        if not KEY_PATTERN.match(key):
            raise ValueError("not a cache key")
        return self.directory / f"{key}.json"

    def get(self, key: str) -> CachedAnswer | StoredAnswer | None:
        """The stored answer, or None (a miss). Counts the hit in the index. A ``StoredAnswer`` holds its file
        open: whoever gets one closes it."""
        entry = self._index.get(key)
        if entry is None:
            pending = self._pending.get(key)
            if pending is not None:
                return self._pending_answer(key, pending)
            if not self._loading or self._refused or (entry := self._adopt(key)) is None:
                return None
        now = time.time()
        hot = self._hot.get(key)
        answer: CachedAnswer | StoredAnswer | None
        if hot is None:
            large = entry.size > LARGE_BYTES
            found = self._read(key, functools.partial(open_stored, entry=entry) if large else files.read_document)
            if found is None:
                return None
            answer = found if isinstance(found, StoredAnswer) else answer_from(key, found)
            if answer is None:
                self._discard_corrupt(key, "missing fields")
                return None
            self._keep_hot(answer, entry.size)
        else:
            answer = hot[0]
            self._hot.move_to_end(key)
        # the file's mtime records the last use, so LRU order survives a restart; a link is never followed
        try:
            files.touch(self._dir, key, now)
        except (FileNotFoundError, NotADirectoryError):
            self._drop(key)  # removed behind our back: what the user deleted is not served from memory
            if isinstance(answer, StoredAnswer):
                answer.close()
            return None
        except OSError:
            pass  # a read-only cache still serves
        entry.hits += 1
        entry.last_used = now
        self._index.move_to_end(key)
        return answer

    def _pending_answer(self, key: str, data: bytes) -> CachedAnswer | None:
        """A pending entry's answer; a large one parsed once, shared by every client until its file is written."""
        answer = self._pending_answers.get(key)
        if answer is None:
            answer = answer_from(key, orjson.loads(data))
            if answer is not None and len(data) > LARGE_BYTES:
                self._pending_answers[key] = answer
        return answer

    def _adopt(self, key: str) -> IndexEntry | None:
        """Index the entry file for ``key`` if there is one: the start-up scan may not have reached it yet."""
        entry = files.stat_entry(self._dir, key)
        if entry is not None:
            self._index[key] = entry
            self.total_bytes += entry.size
        return entry

    def _keep_hot(self, answer: CachedAnswer | StoredAnswer, size: int) -> None:
        if size > LARGE_BYTES or isinstance(answer, StoredAnswer):
            return  # a rare huge answer would push out many ordinary ones
        self._hot[answer.key] = (answer, size)
        self._hot_bytes += size
        while self._hot_bytes > HOT_BYTES:
            _, (_, dropped) = self._hot.popitem(last=False)
            self._hot_bytes -= dropped

    def read_document(self, key: str) -> dict[str, Any] | None:
        """The whole stored file (for /debug/cache/{key}); does not count as a hit."""
        return self._read(key, files.read_document) if key in self._index else None

    def _read(self, key: str, read: Callable[[str, str], T]) -> T | None:
        try:
            return read(self._dir, key)
        except (FileNotFoundError, NotADirectoryError):
            self._drop(key)  # removed behind our back (with its directory, even): gone, not corrupt
        except files.NotOurs as exc:  # planted: not served, and not ours to delete
            log.warning("cache entry %s skipped: %s", key[:12], exc.strerror)
            self.foreign_skipped += 1
            self._drop(key)
        except OSError as exc:
            log.warning("cache entry %s unreadable (%s): treated as a miss", key[:12], exc.strerror)
            self._discard_corrupt(key, "unreadable")
        except files.CorruptEntry as exc:
            self._discard_corrupt(key, str(exc))
        return None

    def summaries(self) -> list[tuple[str, IndexEntry]]:
        """Index entries, newest first."""
        return sorted(self._index.items(), key=lambda item: item[1].created, reverse=True)

    # ----------------------------------------------------------------- writes
    @property
    def storing(self) -> bool:
        # after a pause, try again: the disk may have been freed or remounted
        if self._refused:  # not our directory: no later retry makes it ours
            return False
        return self.store_disabled_reason is None or time.monotonic() >= self._store_retry_at

    def put(self, key: str, entry: CacheEntry) -> bool:
        """Store ``entry`` under ``key``. False if it is not stored (storing is off, or the write failed);
        with a writer, True means queued: a failed write is then counted and logged by the writer."""
        if not self.storing:
            return False
        data = orjson.dumps(entry.document(key))
        if self._writer is not None:
            self._pending[key] = data
            self._discard.discard(key)
            self._writer.submit(key, data)
            return True
        try:
            self._write_atomically(key, data)
        except OSError as exc:
            self._write_failed(key, exc)
            return False
        self._written(key, len(data))
        return True

    def _write_failed(self, key: str, exc: OSError) -> None:
        self._pending.pop(key, None)
        self._pending_answers.pop(key, None)
        self._discard.discard(key)
        self.store_errors += 1
        if exc.errno in files.DISK_REFUSALS:
            self._disable_store(f"cannot write to {self.directory}: {exc.strerror}")
        else:
            log.warning("could not store cache entry %s: %s", key[:12], exc)

    def _written(self, key: str, size: int) -> None:
        """The entry is on disk: index it (on the loop), unless it was deleted while being written."""
        self._pending.pop(key, None)
        self._pending_answers.pop(key, None)
        if key in self._discard:
            self._discard.discard(key)
            self._remove_file(key)
            return
        if self.store_disabled_reason is not None:
            log.warning("cache storing resumed in %s", self.directory)
            self.store_disabled_reason = None
        now = time.time()
        old = self._index.pop(key, None)
        if old is not None:
            self.total_bytes -= old.size
            self._forget_hot(key)  # a new answer under the same key replaces the one in memory too
        self._index[key] = IndexEntry(size=size, created=now, last_used=now)
        self.total_bytes += size
        self.stores += 1
        self._evict(keep=key)

    def start_writer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write entries behind, from one thread; its results are applied on ``loop``."""
        self._writer = EntryWriter(self._write_atomically, loop, self._written, self._write_failed)
        self._writer.start()

    def stop_writer(self, timeout: float = 10.0) -> None:
        """Finish the queued writes (blocking: call it from a thread) and stop the writer."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop(timeout)

    def _write_atomically(self, key: str, data: bytes) -> None:
        files.write_atomically(self._dir, key, data, self._pid)

    def delete(self, key: str) -> bool:
        found = False
        self._pending_answers.pop(key, None)
        if self._pending.pop(key, None) is not None:
            self._discard.add(key)  # its write may still finish: the file is removed then
            found = True
        if key in self._index:
            self._remove_file(key)
            self._drop(key)
            found = True
        return found

    def clear(self) -> int:
        pending = list(self._pending)
        self._discard.update(pending)
        self._pending.clear()
        self._pending_answers.clear()
        keys = list(self._index)
        unindexed = 0
        if self._loading:  # the files the scan has not indexed yet go too, and the merge drops its finds
            self._cleared_while_loading = True
            unindexed = files.remove_unindexed(self._dir, self._index)
        for key in keys:
            self._remove_file(key)
            self._drop(key)
        return len(keys) + len(pending) + unindexed

    # ----------------------------------------------------------------- internals
    def _evict(self, keep: str | None = None) -> None:
        while self._index and (len(self._index) > self.max_entries or self.total_bytes > self.max_bytes):
            key = next(iter(self._index))
            if key == keep and len(self._index) == 1:
                break  # a single answer larger than the byte budget is kept until the next one comes
            self._remove_file(key)
            self._drop(key)
            self.evictions += 1

    def _drop(self, key: str) -> None:
        entry = self._index.pop(key, None)
        if entry is not None:
            self.total_bytes -= entry.size
        if self._loading:
            self._gone_while_loading.add(key)
        self._forget_hot(key)

    def _forget_hot(self, key: str) -> None:
        hot = self._hot.pop(key, None)
        if hot is not None:
            self._hot_bytes -= hot[1]

    def _remove_file(self, key: str) -> None:
        files.remove_entry(self._dir, key)

    def _discard_corrupt(self, key: str, why: str) -> None:
        log.warning("cache entry %s is corrupt (%s): deleted, treated as a miss", key[:12], why)
        self.corrupt_discarded += 1
        self._remove_file(key)
        self._drop(key)

    def _disable_store(self, reason: str) -> None:
        if self.store_disabled_reason is None:
            log.error("cache: %s; answers are still served but no longer stored", reason)
        self.store_disabled_reason = reason
        self._store_retry_at = time.monotonic() + RETRY_STORE_AFTER
