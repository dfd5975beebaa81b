"""A large cached answer served from its file a piece at a time: ``Layout`` and ``StoredAnswer``.

A hit used to parse the whole file and render the whole answer for each client: thirty clients that stopped reading
a 20 MB answer held thirty renderings (issue 16). A large entry's file is instead parsed once, on its first hit, to
find where its parts lie (``layout_of``); every hit then reads, decodes and sends one piece at a time from an open
descriptor (``StoredAnswer``), so a client's memory is one piece whatever the answer's size.

Byte offsets are trusted only because the file is exactly orjson's rendering of its document (as the proxy writes
it): ``layout_of`` checks every part against a rendering of its own and gives up (None: the entry is served the old
way, parsed whole) on a file written otherwise. The descriptor pins the file that was laid out: a new answer stored
under the key is a new file (renamed into place), and an entry deleted meanwhile is still read to its end.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from llmpod.proxy import _cache_files as files
from llmpod.proxy._cache_entries import CachedAnswer, stored_seconds
from llmpod.proxy.pieces import PIECE_BYTES, SizedBody, sized, slices

DONE_EVENT = b"data: [DONE]\n\n"
EVENT_FRAME = len(b"data: ") + len(b"\n\n")


@dataclass(slots=True, frozen=True)
class Layout:
    """Where one entry file's parts lie, for the file (inode and size) it was found in."""

    inode: int
    size: int
    response: tuple[int, int]  # the byte range of the ``response`` object: exactly the non-streamed answer
    batches: tuple[tuple[int, int], ...]  # byte ranges of runs of ``chunks`` strings (their JSON, commas between)
    chunks_sse_bytes: int  # the streamed answer's length without the usage event and [DONE]
    usage_chunk: str | None
    completion_tokens: int
    generation_seconds: float | None = None  # what a hit on it saves; None in entries stored before it was recorded

    def fits(self, info: os.stat_result) -> bool:
        return info.st_ino == self.inode and info.st_size == self.size


def layout_of(data: bytes, document: dict[str, Any], info: os.stat_result) -> Layout | None:
    """The layout of an entry file (``data``, parsed as ``document``); None if the file is not exactly orjson's
    rendering of the document (then offsets found by rendering again would not be the file's)."""
    view = memoryview(data)
    if not data.startswith(b"{") or not data.endswith(b"}"):
        return None
    chunks, usage_chunk = document.get("chunks"), document.get("usage_chunk")
    if not isinstance(chunks, list) or not isinstance(usage_chunk, (str, type(None))):
        return None
    ranges: dict[str, tuple[int, int]] = {}
    batches: list[tuple[int, int]] = []
    sse_bytes = 0
    position = 1
    try:
        for index, (name, value) in enumerate(document.items()):
            label = (b"," if index else b"") + orjson.dumps(name) + b":"
            if view[position : position + len(label)] != label:
                return None
            position += len(label)
            if name == "chunks":
                found = _chunk_batches(view, position, chunks)
                if found is None:
                    return None
                end, batches, sse_bytes = found
            else:
                rendered = orjson.dumps(value)
                end = position + len(rendered)
                if view[position:end] != rendered:
                    return None
            ranges[name] = (position, end)
            position = end
        completion_tokens = int(document.get("completion_tokens") or 0)
    except (orjson.JSONEncodeError, TypeError, ValueError):
        return None
    if position != len(data) - 1 or "response" not in ranges:
        return None
    return Layout(
        inode=info.st_ino,
        size=info.st_size,
        response=ranges["response"],
        batches=tuple(batches),
        chunks_sse_bytes=sse_bytes,
        usage_chunk=usage_chunk,
        completion_tokens=completion_tokens,
        generation_seconds=stored_seconds(document.get("generation_seconds")),
    )


def _chunk_batches(view: memoryview, position: int, chunks: list[Any]) -> tuple[int, list[tuple[int, int]], int] | None:
    """The end of the ``chunks`` array starting at ``position``, its strings' byte ranges in runs of about
    ``PIECE_BYTES``, and the length of their SSE events; None if the file is not as orjson writes them."""
    if not _is(view, position, b"["):
        return None
    position += 1
    batches: list[tuple[int, int]] = []
    start: int | None = None
    sse_bytes = 0
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, str):
            return None
        if index:
            if not _is(view, position, b","):
                return None
            position += 1
        if start is None:
            start = position
        rendered = orjson.dumps(chunk)
        if view[position : position + len(rendered)] != rendered:
            return None
        position += len(rendered)
        sse_bytes += EVENT_FRAME + len(chunk.encode())
        if position - start >= PIECE_BYTES:
            batches.append((start, position))
            start = None
    if start is not None:
        batches.append((start, position))
    if not _is(view, position, b"]"):
        return None
    return position + 1, batches, sse_bytes


def open_stored(directory: str, key: str, entry: files.IndexEntry) -> StoredAnswer | dict[str, Any]:
    """``key``'s file, opened to be served a piece at a time, its layout found (once: kept in ``entry``); the
    parsed document instead if the file is not laid out as the proxy writes it. Raises as ``read_document``."""
    fd = files.open_entry(directory, key)
    try:
        info = os.fstat(fd)
        if entry.layout is None or not entry.layout.fits(info):
            data = files.read_all(fd)
            document = files.parse_document(data, key)
            entry.layout = layout_of(data, document, info)
            if entry.layout is None:
                os.close(fd)
                return document
    except BaseException:
        os.close(fd)
        raise
    return StoredAnswer(key, fd, entry.layout)


def _is(view: memoryview, position: int, char: bytes) -> bool:
    return position < len(view) and view[position] == char[0]


class StoredAnswer:
    """A large cached answer, served from its open file a piece at a time; ``close`` lets the file go."""

    __slots__ = ("fd", "key", "layout")

    def __init__(self, key: str, fd: int, layout: Layout) -> None:
        self.key = key
        self.fd: int | None = fd
        self.layout = layout

    @property
    def completion_tokens(self) -> int:
        return self.layout.completion_tokens

    @property
    def generation_seconds(self) -> float | None:
        return self.layout.generation_seconds

    def json_length(self) -> int:
        start, end = self.layout.response
        return end - start

    def json_pieces(self) -> Iterator[bytes]:
        """The non-streamed answer: the file's bytes of its ``response``, as they are."""
        start, end = self.layout.response
        for offset in range(start, end, PIECE_BYTES):
            yield self._read(offset, min(PIECE_BYTES, end - offset))

    def sse_length(self, include_usage: bool) -> int:
        usage = self.layout.usage_chunk
        extra = EVENT_FRAME + len(usage.encode()) if include_usage and usage is not None else 0
        return self.layout.chunks_sse_bytes + extra + len(DONE_EVENT)

    def sse_pieces(self, include_usage: bool) -> Iterator[bytes]:
        """The streamed answer, as ``CachedAnswer.sse_bytes`` renders it, one run of chunks at a time."""
        for start, end in self.layout.batches:
            chunks = orjson.loads(b"[" + self._read(start, end - start) + b"]")
            yield "".join([f"data: {chunk}\n\n" for chunk in chunks]).encode()
        usage = self.layout.usage_chunk
        tail = f"data: {usage}\n\n".encode() if include_usage and usage is not None else b""
        yield tail + DONE_EVENT

    def _read(self, offset: int, length: int) -> bytes:
        if self.fd is None:
            raise OSError("the cache entry's file is closed")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:  # truncated in place behind our back: the length already sent cannot be met
            raise OSError(f"cache entry {self.key[:12]} shrank while being served")
        return data

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def hit_response(
    answer: CachedAnswer | StoredAnswer, stream: bool, include_usage: bool, headers: Mapping[str, str]
) -> Response:
    """What a cache hit sends: a small answer in one message, a large one in pieces (from its file if it has one)."""
    media_type = "text/event-stream" if stream else "application/json"
    if isinstance(answer, StoredAnswer):
        if stream:
            pieces, length = answer.sse_pieces(include_usage), answer.sse_length(include_usage)
        else:
            pieces, length = answer.json_pieces(), answer.json_length()
        return SizedBody(pieces, length, media_type=media_type, headers=headers, close=answer.close)
    if not stream:
        return sized(answer.json_bytes(), media_type=media_type, headers=headers)
    events, end = answer.sse_parts(include_usage)
    if len(events) + len(end) <= PIECE_BYTES:
        return Response(events + end, media_type=media_type, headers=headers)
    return SizedBody(
        itertools.chain(slices(events), (end,)), len(events) + len(end), media_type=media_type, headers=headers
    )
