"""EventStream over a real uvicorn on loopback: pieces go out as they come, and a client that leaves ends the
stream at once (its generator closed, the request's task not left cancelled)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncGenerator, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmpod.sse_response import EventStream
from tests.support.helpers import wait_until
from tests.support.servers import LoopbackServer


class Probe:
    """What the server side saw, for the test thread."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = threading.Event()
        self.sent = 0
        self.after: list[str] = []


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(probe: Probe) -> Iterator[LoopbackServer]:
    async def pieces() -> AsyncGenerator[bytes, None]:
        try:
            for n in range(3):
                probe.sent += 1
                yield b"data: %d\n\n" % n
            while not probe.release.is_set():  # hold the stream open until the test says so
                await asyncio.sleep(0.01)
            yield b"data: [DONE]\n\n"
        finally:
            probe.closed.set()

    async def stream(request: Request) -> EventStream:
        return EventStream(pieces(), headers={"X-Cache": "MISS", "Cache-Control": "no-cache"})

    class AfterStream:  # a raw ASGI endpoint: the request's task goes on after the stream
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await EventStream(pieces())(scope, receive, send)
            # after a client left, the task must not carry a stray cancellation into what follows
            task = asyncio.current_task()
            probe.after.append(f"cancelling={task.cancelling() if task and hasattr(task, 'cancelling') else 0}")

    app = Starlette(routes=[Route("/stream", stream), Route("/after", AfterStream())])
    with LoopbackServer(app) as running:
        yield running


def test_pieces_arrive_with_status_and_headers(server: LoopbackServer, probe: Probe) -> None:
    probe.release.set()
    with httpx.stream("GET", f"{server.url}/stream", timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["x-cache"] == "MISS" and response.headers["cache-control"] == "no-cache"
        body = b"".join(response.iter_bytes())
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert probe.closed.is_set()


@pytest.mark.parametrize("path", ["/stream", "/after"])
def test_a_client_leaving_closes_the_generator_at_once(server: LoopbackServer, probe: Probe, path: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while b"data: 2" not in received:
            piece = sock.recv(65536)
            assert piece, f"the server closed the stream early: {received!r}"
            received += piece
        assert not probe.closed.is_set()
    wait_until(probe.closed.is_set, "the stream's generator closed after the client left", timeout=10)
    if path == "/after":
        wait_until(lambda: bool(probe.after), "the request's task finished")
        assert probe.after == ["cancelling=0"]
