"""What one cache entry holds: ``CacheEntry``, the fields written to its file (and the file's ``FORMAT_VERSION``),
and ``CachedAnswer``, what a hit serves, parsed from such a file by ``answer_from``. ``ResponseCache`` (cache.py)
decides when; ``_cache_files`` keeps the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

FORMAT_VERSION = 1


@dataclass(slots=True)
class CacheEntry:
    """What is stored for one answer; its file holds these fields, after ``format`` and ``key``."""

    endpoint: str
    model: Any  # the request's (a client may send any JSON there)
    created: float
    preview: str  # the first words of the question, for /debug/cache
    completion_tokens: int
    request: dict[str, Any]  # as forwarded, without ``stream``/``stream_options``
    response: dict[str, Any]  # the answer assembled as a non-streamed response
    chunks: list[str]  # the upstream's SSE data payloads, in order, without the usage chunk
    usage_chunk: str | None
    # the kind of server that answered (llmpod/server_kind.py), which the key names too; None in /debug/cache for
    # entries written before it was keyed (their keys never match again)
    kind: str | None = None
    key_rules: list[str] = field(default_factory=list)  # the key rules that took volatile parts out of its key
    generation_seconds: float | None = None  # how long the upstream took for it: what each hit saves

    def document(self, key: str) -> dict[str, Any]:
        """The file's JSON object; the fields in their declared order (``__slots__`` keeps it)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        if not self.key_rules:  # the file of a request no rule touched is written as before the rules existed
            del fields["key_rules"]
        return {"format": FORMAT_VERSION, "key": key, **fields}


@dataclass(slots=True)
class CachedAnswer:
    """What a hit serves: the stored file, parsed."""

    key: str
    response: dict[str, Any]
    chunks: list[str]  # the upstream's SSE data payloads, in order, without the usage chunk
    usage_chunk: str | None
    completion_tokens: int
    generation_seconds: float | None = None  # None in entries stored before it was recorded
    _json: bytes | None = None  # rendered once: a hot answer is served many times
    _sse: bytes | None = None  # rendered once (without the usage event): shared by every client it is sent to

    def json_bytes(self) -> bytes:
        if self._json is None:
            self._json = orjson.dumps(self.response)
        return self._json

    def sse_bytes(self, include_usage: bool) -> bytes:
        return b"".join(self.sse_parts(include_usage))

    def sse_parts(self, include_usage: bool) -> tuple[bytes, bytes]:
        """The streamed answer as its chunks' events (rendered once, shared) and the end (usage event, [DONE])."""
        if self._sse is None:
            self._sse = "".join([f"data: {chunk}\n\n" for chunk in self.chunks]).encode()
        if include_usage and self.usage_chunk is not None:
            return self._sse, f"data: {self.usage_chunk}\n\ndata: [DONE]\n\n".encode()
        return self._sse, b"data: [DONE]\n\n"


def answer_from(key: str, document: Any) -> CachedAnswer | None:
    """The answer a stored document holds; None if a field it needs is missing or of the wrong type."""
    try:
        return CachedAnswer(
            key=key,
            response=document["response"],
            chunks=document["chunks"],
            usage_chunk=document.get("usage_chunk"),
            completion_tokens=int(document.get("completion_tokens") or 0),
            generation_seconds=stored_seconds(document.get("generation_seconds")),
        )
    except (KeyError, TypeError, ValueError):
        return None


def stored_seconds(value: Any) -> float | None:
    """A stored duration; None for a missing or nonsensical one (a hand-edited file must not fail the hit)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        return None
    return float(value)
