"""Clients that stop reading large answers must not grow the proxy's memory (issue 16, "Robustness").

Thirty clients that sent a request for a 20 MB cached answer and then read nothing took the proxy from 61 to 798
MB: each got its own rendering of the answer, handed whole to its connection's write buffer. Now a large answer
goes a piece at a time, the next made only once the client took the last, from the entry's file (a hit) or from
the flight's one copy (a coalesced stream, its backlog, its plain answer). These tests run the proxy as users do
(a subprocess, uvicorn's own HTTP parser and flow control) and read its RSS from /proc; the stalled clients are
real sockets with small receive buffers. The memory bounds are generous: the old code exceeded them many times over.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bench.servers import ServerProcess
from llmpod.proxy._cache_stream import StoredAnswer, hit_response
from llmpod.proxy.cache import CachedAnswer, CacheEntry, ResponseCache, cache_key
from llmpod.proxy.pieces import SizedBody
from llmpod.server_kind import VLLM
from tests.faults.hostile import proxy_process, rss_mib
from tests.support.servers import LoopbackServer

MODEL = "big-model"
PIECE = 'lorem "ipsum" dolor \\ sit amet, é ünïcode; ' * 40  # escapes and non-ASCII: decoded length differs
HEAD = '{"id":"chatcmpl-big","object":"chat.completion.chunk","created":1700000000,"model":"big-model"'
STALLED = 30  # as in the issue
GROWTH_BOUND_MIB = 60.0  # measured: 16 MiB; the old code grew 200 to 300 MiB for the same stalled readers
FLIGHT_BOUND_MIB = 160.0  # the flight's own copies of a 10 MB answer and its cache write (measured: 90); old: 340
READ_BOUND = 60.0


def content_chunk(text: str) -> str:
    return HEAD + ',"choices":[{"index":0,"delta":{"content":' + orjson.dumps(text).decode() + "}}]}"


FIRST_CHUNK = HEAD + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
LAST_CHUNK = HEAD + ',"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
USAGE_CHUNK = HEAD + ',"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'


def chat(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 100_000, **extra}


def sse(chunks: list[str], usage: str | None) -> bytes:
    return "".join(f"data: {c}\n\n" for c in [*chunks, *([usage] if usage else []), "[DONE]"]).encode()


# ------------------------------------------------------------------------------------------ an upstream that waits
class HeldUpstream:
    """Streams ``events`` content chunks, the second half only once ``release`` is set (so that late joiners
    find a large backlog in the flight); counts the generations it was asked for."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.release = threading.Event()
        self.generations = 0
        self.chunks = [FIRST_CHUNK, *(content_chunk(f"{i} {PIECE}") for i in range(events)), LAST_CHUNK]

    def app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            body = await request.json()
            self.generations += 1
            if body.get("max_tokens") == 1:  # a warm-up: a short answer at once
                short = "".join(f"data: {c}\n\n" for c in [FIRST_CHUNK, content_chunk("hi"), LAST_CHUNK, "[DONE]"])
                return Response(short, media_type="text/event-stream")
            return StreamingResponse(self._stream(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])

    async def _stream(self) -> AsyncIterator[bytes]:
        half = len(self.chunks) // 2
        for start in range(0, len(self.chunks), 100):
            if start >= half:
                deadline = time.monotonic() + READ_BOUND
                while not self.release.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            yield "".join(f"data: {c}\n\n" for c in self.chunks[start : start + 100]).encode()
        yield f"data: {USAGE_CHUNK}\n\ndata: [DONE]\n\n".encode()


@pytest.fixture
def held() -> Iterator[tuple[HeldUpstream, LoopbackServer]]:
    upstream = HeldUpstream(events=5_000)  # about 10 MB of SSE
    with LoopbackServer(upstream.app()) as server:
        yield upstream, server
        upstream.release.set()


@pytest.fixture
def proxy(tmp_path: Path, held: tuple[HeldUpstream, LoopbackServer]) -> Iterator[ServerProcess]:
    server = proxy_process(tmp_path, f"{held[1].url}/v1", UPSTREAM_KIND=VLLM)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ helpers
def big_entry(question: str, events: int) -> tuple[str, CacheEntry]:
    chunks = [FIRST_CHUNK, *(content_chunk(f"{i} {PIECE}") for i in range(events)), LAST_CHUNK]
    text = "".join(f"{i} {PIECE}" for i in range(events))
    response = {
        "id": "chatcmpl-big",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    request = {k: v for k, v in chat(question).items()}
    entry = CacheEntry(
        endpoint="chat.completions",
        model=MODEL,
        created=time.time(),
        preview=question,
        completion_tokens=events,
        request=request,
        response=response,
        chunks=chunks,
        usage_chunk=USAGE_CHUNK,
        kind=VLLM,
    )
    return cache_key("chat.completions", request, VLLM), entry


def plant(cache_dir: Path, key: str, entry: CacheEntry) -> int:
    """Write ``entry`` as the proxy would (before it starts: the start-up scan indexes it); its size."""
    cache_dir.mkdir(mode=0o700, exist_ok=True)
    path = cache_dir / f"{key}.json"
    path.write_bytes(orjson.dumps(entry.document(key)))
    path.chmod(0o600)
    return path.stat().st_size


def stall(port: int, body: dict[str, Any], version: str = "1.1") -> socket.socket:
    """Send the request on a socket with a small receive buffer, then read nothing (the status line aside)."""
    data = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(READ_BOUND)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def peak_growth(pid: int, before: float, seconds: float = 1.5) -> float:
    """The largest RSS growth over ``before`` seen within ``seconds`` (the answers are being written meanwhile)."""
    peak = rss_mib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        peak = max(peak, rss_mib(pid))
    return peak - before


def raw_answer(port: int, body: dict[str, Any], version: str) -> tuple[bytes, bytes]:
    """(head, body) of one request on its own connection, read until the server closes it."""
    sock = stall(port, body, version)
    received = []
    with sock:
        while data := sock.recv(1 << 20):
            received.append(data)
    head, _, rest = b"".join(received).partition(b"\r\n\r\n")
    return head, rest


def warm_up(proxy: ServerProcess) -> float:
    """One small request (imports, the upstream client) so that only what follows counts; the RSS then."""
    httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("warm-up", max_tokens=1), timeout=READ_BOUND)
    time.sleep(0.2)
    return rss_mib(proxy.pid)


# ------------------------------------------------------------------------------------------ cache hits
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stalled_readers_of_a_large_hit_do_not_grow_memory(
    tmp_path: Path, held: tuple[HeldUpstream, LoopbackServer], stream: bool
) -> None:
    key, entry = big_entry("a large cached answer", events=4_000)
    size = plant(tmp_path / "proxy_cache", key, entry)
    assert size > 15_000_000  # a response and its stream of about 8 MB each
    held[0].release.set()
    server = proxy_process(tmp_path, f"{held[1].url}/v1", UPSTREAM_KIND=VLLM)
    server.start()
    stalled: list[socket.socket] = []
    try:
        before = warm_up(server)
        for _ in range(STALLED):
            stalled.append(stall(server.port, chat("a large cached answer", stream=stream)))
        for sock in stalled:
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
        growth = peak_growth(server.pid, before)
        # meanwhile a client that reads gets the whole answer, byte for byte
        fast = httpx.post(f"{server.url}/v1/chat/completions", json=chat("a large cached answer", stream=stream))
        assert fast.headers["x-cache"] == "HIT"
        expected = sse(entry.chunks, None) if stream else orjson.dumps(entry.response)
        assert fast.content == expected
        assert int(fast.headers["content-length"]) == len(expected)
        assert growth < GROWTH_BOUND_MIB, f"{STALLED} stalled readers grew the proxy by {growth:.0f} MiB"
    finally:
        for sock in stalled:
            sock.close()
        server.stop()
    assert held[0].generations == 1  # the warm-up only: every large request was a hit


def test_a_large_hit_is_byte_identical_in_every_form(tmp_path: Path, held: tuple[HeldUpstream, LoopbackServer]) -> None:
    key, entry = big_entry("byte for byte", events=800)  # over the size served from the file
    plant(tmp_path / "proxy_cache", key, entry)
    server = proxy_process(tmp_path, f"{held[1].url}/v1", UPSTREAM_KIND=VLLM)
    server.start()
    try:
        usage = {"stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=server.url, timeout=READ_BOUND) as client:
            for _ in range(2):  # the first hit lays the file out, the second uses that layout
                plain = client.post("/v1/chat/completions", json=chat("byte for byte"))
                assert plain.headers["x-cache"] == "HIT"
                assert plain.content == orjson.dumps(entry.response)
                assert plain.headers["content-type"] == "application/json"
                streamed = client.post("/v1/chat/completions", json=chat("byte for byte", stream=True))
                assert streamed.content == sse(entry.chunks, None)
                assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
                with_usage = client.post("/v1/chat/completions", json=chat("byte for byte", **usage))
                assert with_usage.content == sse(entry.chunks, USAGE_CHUNK)
        for body, expected in [
            (chat("byte for byte"), orjson.dumps(entry.response)),
            (chat("byte for byte", **usage), sse(entry.chunks, USAGE_CHUNK)),
        ]:
            head, received = raw_answer(server.port, body, "1.0")
            assert b"transfer-encoding" not in head.lower()
            assert f"content-length: {len(expected)}".encode() in head.lower()
            assert received == expected
    finally:
        server.stop()
    assert held[0].generations == 0


# ------------------------------------------------------------------------------------------ live flights
def test_stalled_listeners_of_a_coalesced_flight_do_not_grow_memory(
    proxy: ServerProcess, held: tuple[HeldUpstream, LoopbackServer]
) -> None:
    upstream, _ = held
    before = warm_up(proxy)
    question = "one flight, many listeners"
    with httpx.Client(base_url=proxy.url, timeout=READ_BOUND) as client:
        first = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=chat(question, stream=True)))
        first.start()  # launches the flight, and reads it all
        deadline = time.monotonic() + READ_BOUND
        while upstream.generations == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # the first half (about 5 MB) arrives: late joiners find it as backlog
        # streamed (HTTP/1.1 and 1.0, which gets the whole stream with its length once it ends) and plain listeners
        kinds = [(True, "1.1"), (False, "1.1"), (True, "1.0")]
        stalled = [stall(proxy.port, chat(question, stream=kinds[i % 3][0]), kinds[i % 3][1]) for i in range(STALLED)]
        try:
            fast: dict[str, httpx.Response] = {}
            reader = threading.Thread(
                target=lambda: fast.setdefault(
                    "answer", client.post("/v1/chat/completions", json=chat(question, stream=True))
                )
            )
            reader.start()
            for sock in stalled[::3]:  # streamed over HTTP/1.1: the status line now; the others at the end
                assert sock.recv(12).startswith(b"HTTP/1.1 200")
            growth_live = peak_growth(proxy.pid, before)
            upstream.release.set()
            reader.join(READ_BOUND)
            first.join(READ_BOUND)
            growth_done = peak_growth(proxy.pid, before)
            answer = fast["answer"]
            assert answer.headers["x-cache"] == "COALESCED"
            assert answer.content == sse(upstream.chunks, None)
            assert upstream.generations == 2  # the warm-up and the one flight
        finally:
            for sock in stalled:
                sock.close()
    # the flight's one copy of the answer (events, the assembled answer, the cache write) is the cost, whatever
    # the number of listeners; the old code held the backlog, or the rendered answer, once per stalled listener
    assert growth_live < GROWTH_BOUND_MIB, f"{STALLED} stalled listeners grew the proxy by {growth_live:.0f} MiB"
    assert growth_done < FLIGHT_BOUND_MIB, f"{STALLED} stalled listeners, flight done: {growth_done:.0f} MiB"


def test_a_hit_served_from_its_file_lets_the_file_go(tmp_path: Path, held: tuple[HeldUpstream, LoopbackServer]) -> None:
    """Every hit served from a file closes it: finished, cut by the client, or abandoned."""
    key, entry = big_entry("descriptors", events=800)
    plant(tmp_path / "proxy_cache", key, entry)
    server = proxy_process(tmp_path, f"{held[1].url}/v1", UPSTREAM_KIND=VLLM)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=READ_BOUND) as client:
            client.post("/v1/chat/completions", json=chat("descriptors"))
            before = len(os.listdir(f"/proc/{server.pid}/fd"))
            for _ in range(5):
                client.post("/v1/chat/completions", json=chat("descriptors", stream=True))
                stall(server.port, chat("descriptors", stream=True)).close()  # gone at once
            time.sleep(0.5)
            entry_path = str(tmp_path / "proxy_cache" / f"{key}.json")
            links = [os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{server.pid}/fd")]
            assert entry_path not in {link for link in links}
            assert len(links) <= before + 2
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ the file layer
def loaded(directory: Path) -> ResponseCache:
    cache = ResponseCache(directory, max_entries=100, max_bytes=10**9)
    cache.load()
    return cache


def streamed(answer: StoredAnswer, include_usage: bool) -> bytes:
    body = b"".join(answer.sse_pieces(include_usage))
    assert len(body) == answer.sse_length(include_usage)
    return body


def test_a_large_entry_written_otherwise_is_served_parsed(tmp_path: Path) -> None:
    key, entry = big_entry("pretty-printed", events=800)
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    (directory / f"{key}.json").write_text(json.dumps(entry.document(key), indent=1))  # offsets would not match
    (directory / f"{key}.json").chmod(0o600)
    answer = loaded(directory).get(key)
    assert isinstance(answer, CachedAnswer)
    assert answer.sse_bytes(False) == sse(entry.chunks, None)


def test_a_large_entry_stored_again_is_laid_out_again(tmp_path: Path) -> None:
    cache = loaded(tmp_path / "cache")
    key, first = big_entry("stored twice", events=800)
    _, second = big_entry("stored twice", events=900)
    assert cache.put(key, first)
    old = cache.get(key)
    assert isinstance(old, StoredAnswer)
    try:
        assert cache.put(key, second)
        new = cache.get(key)
        assert isinstance(new, StoredAnswer)
        try:
            assert streamed(new, True) == sse(second.chunks, USAGE_CHUNK)
            assert b"".join(new.json_pieces()) == orjson.dumps(second.response)
        finally:
            new.close()
        # a hit already under way goes on with the file it opened: never half of one answer and half of another
        assert streamed(old, False) == sse(first.chunks, None)
        assert b"".join(old.json_pieces()) == orjson.dumps(first.response)
    finally:
        old.close()


async def test_a_large_answer_still_being_written_is_parsed_once_for_every_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = loaded(tmp_path / "cache")
    written = threading.Event()
    write = cache._write_atomically
    monkeypatch.setattr(cache, "_write_atomically", lambda key, data: (written.wait(READ_BOUND), write(key, data)))
    cache.start_writer(asyncio.get_running_loop())
    key, entry = big_entry("being written", events=800)
    try:
        assert cache.put(key, entry)
        first, second = cache.get(key), cache.get(key)
        assert isinstance(first, CachedAnswer) and first is second  # one copy, however many clients
        response = hit_response(first, True, True, {})
        assert isinstance(response, SizedBody)  # and sent a piece at a time
        assert b"".join(response.pieces) == sse(entry.chunks, USAGE_CHUNK)
    finally:
        written.set()
        await asyncio.to_thread(cache.stop_writer)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if key in cache:
            break
    stored = cache.get(key)
    assert isinstance(stored, StoredAnswer)  # on disk now: served from the file
    stored.close()
