"""Async client measurements (httpx): streamed timings, coalescing, and batches of cache hits.

Streams are read raw (``aiter_raw``) and every read is timestamped with ``time.perf_counter`` as it
arrives; SSE events are split out afterwards, so parsing never delays a timestamp.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from bench.loadgen import read_http_response

CHAT_PATH = "/v1/chat/completions"
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class StreamSample:
    status: int
    x_cache: str | None
    ttfb: float | None = None  # seconds from sending to the first body bytes
    ttft: float | None = None  # ... to the first data event carrying content
    gaps: list[float] = field(default_factory=list)  # between consecutive content events
    content_events: int = 0
    done: bool = False


def _has_content(data: bytes) -> bool:
    try:
        event = orjson.loads(data)
        choices = event.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
    except (orjson.JSONDecodeError, AttributeError, IndexError, TypeError):
        return False
    return bool(delta.get("content") or delta.get("tool_calls"))  # an agent's turn may start with a tool call


async def timed_stream(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str] | None = None
) -> StreamSample:
    reads: list[tuple[float, bytes]] = []
    started = time.perf_counter()
    async with client.stream("POST", url, content=body, headers={**JSON_HEADERS, **(headers or {})}) as response:
        async for raw in response.aiter_raw():
            reads.append((time.perf_counter(), raw))
        sample = StreamSample(response.status_code, response.headers.get("x-cache"))
    if reads:
        sample.ttfb = reads[0][0] - started
    content_times: list[float] = []
    buffer = b""
    for at, raw in reads:
        buffer += raw
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2 :]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    sample.done = True
                elif _has_content(data):
                    content_times.append(at)
    sample.content_events = len(content_times)
    if content_times:
        sample.ttft = content_times[0] - started
        sample.gaps = [b - a for a, b in itertools.pairwise(content_times)]
    return sample


async def post_json(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(url, content=body, headers={**JSON_HEADERS, **(headers or {})})


@dataclass
class CoalesceRun:
    clients: int
    statuses: dict[str, int]
    x_cache: dict[str, int]
    distinct_bodies: int
    completion_s: list[float]  # each client's time from the common start to its full answer
    send_s: float  # how long writing all the requests took


async def coalesce(url: str, body: bytes, clients: int, timeout: float = 60.0) -> CoalesceRun:
    """``clients`` identical POSTs at once, each on its own connection opened beforehand.

    Raw asyncio sockets rather than an HTTP client library: all requests are written in one tight loop
    (a few milliseconds for 100), so the spread of completion times is the proxy's, not the client's.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    connections = await asyncio.wait_for(
        asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(clients))), timeout
    )
    try:

        async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, float]:
            status, headers, content = await read_http_response(reader)
            return status, headers, content, time.perf_counter()

        started = time.perf_counter()
        for _, writer in connections:
            writer.write(request)
        sent = time.perf_counter()
        done = await asyncio.wait_for(asyncio.gather(*(answer(reader) for reader, _ in connections)), timeout)
    finally:
        for _, writer in connections:
            writer.close()
    statuses: dict[str, int] = {}
    x_cache: dict[str, int] = {}
    for status, headers, _, _ in done:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        label = headers.get("x-cache", "none")
        x_cache[label] = x_cache.get(label, 0) + 1
    return CoalesceRun(
        clients=clients,
        statuses=statuses,
        x_cache=x_cache,
        distinct_bodies=len({content for _, _, content, _ in done}),
        completion_s=sorted(end - started for *_, end in done),
        send_s=sent - started,
    )


async def serve_batch(url: str, bodies: list[bytes], concurrency: int = 4, timeout: float = 30.0) -> dict[str, Any]:
    """POST every body (``concurrency`` at a time); counts of statuses and X-Cache labels."""
    statuses: dict[str, int] = {}
    x_cache: dict[str, int] = {}
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            while queue:
                response = await post_json(client, url, queue.pop())
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                label = response.headers.get("x-cache", "none")
                x_cache[label] = x_cache.get(label, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"requests": len(bodies), "statuses": statuses, "x_cache": x_cache}
