"""The on-disk response cache: one JSON file per answer, named by its key.

* The key is the SHA-256 of a canonical JSON (sorted keys, no whitespace) of the endpoint and the request
  as forwarded, minus the fields that cannot change the answer (``NON_KEY_FIELDS``).
* Files are written to a temp name and renamed, so a crash never leaves a half entry under a key; a file
  that does not parse or does not match its name is deleted and counted, and the request is a miss.
* The index (key -> size and times, never bodies) lives in memory, is rebuilt from a directory scan at
  start (``stat`` only, no file is read), and evicts least-recently-used entries past either limit.
* A full or read-only disk stops storing (logged once, retried after a pause) and never stops serving.
* Entries are written on the event loop, after the answer went out: measured under load, handing the write to a
  thread cost more (the thread and the loop fight over the GIL) than the ~0.1 ms of system calls it saves.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("llmpod.cache")

# Transport and bookkeeping fields: the same question with or without them gets the same answer.
# ``stream``/``stream_options`` are here so a streamed and a plain request share one entry; ``cache`` is
# LiteLLM's per-request control object; ``user``, ``metadata``, ``store`` and ``request_id`` only label.
NON_KEY_FIELDS = frozenset({"stream", "stream_options", "user", "cache", "metadata", "store", "request_id"})
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}\Z")
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
RETRY_STORE_AFTER = 60.0  # seconds before trying to write again after a full or read-only disk


def cache_key(endpoint: str, body: dict[str, Any]) -> str:
    """The hex SHA-256 that names the answer to ``body`` on ``endpoint`` (``chat.completions``…)."""
    request = {}
    for name, value in body.items():
        if name in NON_KEY_FIELDS:
            continue
        # 0 and 0.0 sample the same way; JSON clients differ in which they send
        if type(value) is float and value.is_integer() and abs(value) < 2**63:
            value = int(value)
        request[name] = value
    canonical = orjson.dumps({"endpoint": endpoint, "request": request}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


@dataclass(slots=True)
class IndexEntry:
    size: int
    created: float
    last_used: float
    hits: int = 0


@dataclass(slots=True)
class CachedAnswer:
    """What a hit serves: the stored file, parsed."""

    key: str
    response: dict[str, Any]
    chunks: list[str]  # the upstream's SSE data payloads, in order, without the usage chunk
    usage_chunk: str | None
    completion_tokens: int

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.response)

    def sse_bytes(self, include_usage: bool) -> bytes:
        parts = [f"data: {chunk}\n\n" for chunk in self.chunks]
        if include_usage and self.usage_chunk is not None:
            parts.append(f"data: {self.usage_chunk}\n\n")
        parts.append("data: [DONE]\n\n")
        return "".join(parts).encode()


class ResponseCache:
    """LRU-bounded directory of cached answers. Every method runs on the event loop."""

    def __init__(self, directory: Path, max_entries: int, max_bytes: int) -> None:
        self.directory = directory
        self._dir = str(directory)
        self._pid = os.getpid()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._index: OrderedDict[str, IndexEntry] = OrderedDict()
        self.total_bytes = 0
        self.evictions = 0
        self.corrupt_discarded = 0
        self.store_errors = 0
        self.stores = 0
        self.store_disabled_reason: str | None = None
        self._store_retry_at = 0.0

    # ----------------------------------------------------------------- start-up
    def load(self) -> None:
        """Create the directory if needed and rebuild the index from what is on disk."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._disable_store(f"cannot create {self.directory}: {exc.strerror}")
            return
        self._index.clear()
        self.total_bytes = 0
        found: list[tuple[float, str, int]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(TMP_PREFIX):
                    # a write that a crash interrupted; never served, so just remove it
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                if not (name.endswith(".json") and KEY_PATTERN.match(name[:-5])):
                    continue
                try:
                    stat = entry.stat()
                except OSError:
                    continue
                found.append((stat.st_mtime, name[:-5], stat.st_size))
        found.sort()  # oldest use first = first to evict
        for mtime, key, size in found:
            self._index[key] = IndexEntry(size=size, created=mtime, last_used=mtime)
            self.total_bytes += size
        self._evict()
        if not os.access(self.directory, os.W_OK):
            self._disable_store(f"{self.directory} is not writable")

    # ----------------------------------------------------------------- reads
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def path_for(self, key: str) -> Path:
        if not KEY_PATTERN.match(key):
            raise ValueError("not a cache key")
        return self.directory / f"{key}.json"

    def get(self, key: str) -> CachedAnswer | None:
        """The stored answer, or None (a miss). Counts the hit in the index."""
        entry = self._index.get(key)
        if entry is None:
            return None
        document = self._read(key)
        if document is None:
            return None
        try:
            answer = CachedAnswer(
                key=key,
                response=document["response"],
                chunks=document["chunks"],
                usage_chunk=document.get("usage_chunk"),
                completion_tokens=int(document.get("completion_tokens") or 0),
            )
        except (KeyError, TypeError, ValueError):
            self._discard_corrupt(key, "missing fields")
            return None
        now = time.time()
        entry.hits += 1
        entry.last_used = now
        self._index.move_to_end(key)
        # the file's mtime records the last use, so LRU order survives a restart
        with contextlib.suppress(OSError):
            os.utime(self.directory / f"{key}.json", (now, now))
        return answer

    def read_document(self, key: str) -> dict[str, Any] | None:
        """The whole stored file (for /debug/cache/{key}); does not count as a hit."""
        if key not in self._index:
            return None
        return self._read(key)

    def _read(self, key: str) -> dict[str, Any] | None:
        path = self.directory / f"{key}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._drop(key)  # removed behind our back
            return None
        except OSError as exc:
            log.warning("cache entry %s unreadable (%s): treated as a miss", key[:12], exc.strerror)
            self._discard_corrupt(key, "unreadable")
            return None
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._discard_corrupt(key, "not valid JSON")
            return None
        if not isinstance(document, dict) or document.get("key") != key:
            self._discard_corrupt(key, "does not match its name")
            return None
        return document

    def summaries(self) -> list[tuple[str, IndexEntry]]:
        """Index entries, newest first."""
        return sorted(self._index.items(), key=lambda item: item[1].created, reverse=True)

    # ----------------------------------------------------------------- writes
    @property
    def storing(self) -> bool:
        # after a pause, try again: the disk may have been freed or remounted
        return self.store_disabled_reason is None or time.monotonic() >= self._store_retry_at

    def put(self, key: str, document: dict[str, Any]) -> bool:
        """Store ``document`` under ``key``; False if it could not be written (the proxy carries on)."""
        if not self.storing:
            return False
        document = {"format": FORMAT_VERSION, "key": key, **document}
        data = orjson.dumps(document)
        try:
            self._write_atomically(key, data)
        except OSError as exc:
            self.store_errors += 1
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
                self._disable_store(f"cannot write to {self.directory}: {exc.strerror}")
            else:
                log.warning("could not store cache entry %s: %s", key[:12], exc)
            return False
        if self.store_disabled_reason is not None:
            log.warning("cache storing resumed in %s", self.directory)
            self.store_disabled_reason = None
        now = time.time()
        old = self._index.pop(key, None)
        if old is not None:
            self.total_bytes -= old.size
        self._index[key] = IndexEntry(size=len(data), created=now, last_used=now)
        self.total_bytes += len(data)
        self.stores += 1
        self._evict(keep=key)
        return True

    def _write_atomically(self, key: str, data: bytes) -> None:
        tmp = f"{self._dir}/{TMP_PREFIX}{key}-{self._pid}-{time.monotonic_ns()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, f"{self._dir}/{key}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str) -> bool:
        if key not in self._index:
            return False
        self._remove_file(key)
        self._drop(key)
        return True

    def clear(self) -> int:
        keys = list(self._index)
        for key in keys:
            self._remove_file(key)
            self._drop(key)
        return len(keys)

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

    def _remove_file(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.directory / f"{key}.json")

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
