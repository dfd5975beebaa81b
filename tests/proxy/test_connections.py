"""The connection guard (llmpod/proxy/connections.py) on both of uvicorn's HTTP protocols (issue 16, "Robustness").

These tests are also the alarm for a uvicorn upgrade: the guard hooks uvicorn's protocol classes (their
``cycle``, ``client`` and ``transport``), and if an upgrade changes those, a request head is no longer seen to
complete (the keep-alive test fails), or a slow head is no longer closed (the deadline tests fail).
Real loopback sockets, in-process servers; the deadline is half a second.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmpod.proxy.connections import (
    EXTENSION,
    ConnectionLimits,
    connection_limits,
    guarded_protocol,
    reset_connection,
)
from tests.support.servers import LoopbackServer

TIMEOUT = 0.5
BOUND = 10.0  # seconds any one read may take before the test calls it a hang
GET = b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with whether the connection can be reset; ``/reset`` resets it instead; a POST reads its body, and
    ``/hold`` then works on it until the client leaves."""
    if scope["type"] != "http":
        return
    if scope["method"] == "POST":
        while (await receive()).get("more_body"):
            pass
    if scope["path"] == "/hold":
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    if scope["path"] == "/reset":
        assert reset_connection(scope)
        return
    body = json.dumps({"resettable": EXTENSION in scope.get("extensions", {})}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
    )
    await send({"type": "http.response.body", "body": body})


def protocol(http: str, per_client: int = 100, total: int = 1000, timeout: float = TIMEOUT) -> type[Any]:
    if http == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base  # type: ignore[assignment]
    return guarded_protocol(base, ConnectionLimits(timeout, per_client, total))


@pytest.fixture(params=["httptools", "h11"])
def http(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(http: str) -> Iterator[LoopbackServer]:
    with LoopbackServer(app, http=protocol(http)) as running:
        yield running


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    return sock


def read_until_closed(sock: socket.socket, bound: float = BOUND) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``bound`` seconds pass (False)."""
    received = b""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received, True
        if not data:
            return received, True
        received += data
    return received, False


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """One answer with a Content-Length, on a connection that stays open."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_connection_that_sends_nothing_is_closed_after_the_deadline(server: LoopbackServer) -> None:
    with connect(server.port) as sock:
        started = time.monotonic()
        received, closed = read_until_closed(sock)
        assert closed and received == b""
        assert time.monotonic() - started >= TIMEOUT * 0.8


def test_a_head_that_never_ends_gets_408_and_a_close(server: LoopbackServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(3):  # dribbling more headers does not buy time
            time.sleep(TIMEOUT / 3)
            sock.sendall(b"X-Slow: 1\r\n")
        received, closed = read_until_closed(sock)
    assert closed
    assert received.startswith(b"HTTP/1.1 408 ")
    assert json.loads(received.partition(b"\r\n\r\n")[2])["error"]["code"] == 408


def test_a_kept_alive_connection_outlives_the_deadline_and_a_slow_next_head_does_not(server: LoopbackServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(GET)
        assert read_answer(sock) == (200, {"resettable": True})  # the stall cut can reset this connection
        time.sleep(TIMEOUT * 3)  # well past the head deadline, within uvicorn's keep-alive (5 s): still open
        sock.sendall(GET)
        assert read_answer(sock)[0] == 200
        sock.sendall(b"GET /ok HTTP/1.1\r\n")  # a next head, never finished
        received, closed = read_until_closed(sock)
    assert closed and received.startswith(b"HTTP/1.1 408 ")


def test_an_endless_head_is_cut_by_size(server: LoopbackServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with pytest.raises(OSError):  # the server closes while we still send
            for _ in range(1024):  # 8 MiB: the parsers' own bounds (h11 16 KiB, llhttp 80 KiB) stop it
                sock.sendall(b"X-" + b"j" * 8188 + b"\r\n")
        received, closed = read_until_closed(sock)
    assert closed
    if received:  # the answer may be lost to the reset of data we sent after it: then the close is enough
        assert received.startswith(b"HTTP/1.1 4")


def test_reset_drops_the_connection(server: LoopbackServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /reset HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received, closed = read_until_closed(sock)
    assert closed and received == b""


def test_at_the_cap_the_oldest_slow_head_makes_room(http: str) -> None:
    # a longer deadline: here the slow heads must still be waiting when the cap is reached
    with LoopbackServer(app, http=protocol(http, per_client=4, timeout=5.0)) as server:
        slow = [connect(server.port) for _ in range(4)]
        for sock in slow:
            sock.sendall(b"GET /ok HTTP/1.1\r\n")
        time.sleep(0.1)
        try:
            with connect(server.port) as real:
                real.sendall(GET)
                assert read_answer(real)[0] == 200
                # the oldest slow head was closed for it, the others are still waiting (the deadline will go)
                assert read_until_closed(slow[0]) == (b"", True)
                slow[1].settimeout(0.05)
                with pytest.raises(TimeoutError):
                    slow[1].recv(1)
                # the other slow heads make room next: the real client's idle keep-alive connection is kept
                # while there are any
                newer = [connect(server.port) for _ in range(3)]
                for sock in newer:
                    sock.sendall(GET)
                    assert read_answer(sock)[0] == 200
                assert all(read_until_closed(sock, bound=1.0)[1] for sock in slow[1:])
                # every connection idle now: the oldest idle one (the real client's first) makes room
                with connect(server.port) as extra:
                    extra.sendall(GET)
                    assert read_answer(extra)[0] == 200
                    assert read_until_closed(real) == (b"", True)
                for sock in newer:
                    sock.close()
        finally:
            for sock in slow:
                sock.close()


def test_when_every_connection_is_working_a_new_one_gets_503(http: str) -> None:
    with LoopbackServer(app, http=protocol(http, per_client=3)) as server:
        busy = [connect(server.port) for _ in range(3)]
        try:
            for sock in busy:  # whole requests the app works on (until the client leaves): not sheddable
                sock.sendall(b"POST /hold HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}")
            time.sleep(TIMEOUT * 2)  # older than the deadline: working connections are never closed for it
            with connect(server.port) as refused:
                refused.sendall(GET)
                received, closed = read_until_closed(refused)
            assert closed and received.startswith(b"HTTP/1.1 503 ")
            head, _, body = received.partition(b"\r\n\r\n")
            assert b"retry-after: 1" in head.lower()
            assert json.loads(body)["error"]["code"] == 503
            busy[0].close()  # a slot frees: the next client is served
            time.sleep(0.1)
            with connect(server.port) as later:
                later.sendall(GET)
                assert read_answer(later)[0] == 200
        finally:
            for sock in busy:
                sock.close()


def test_at_the_cap_a_stalled_body_makes_room(http: str) -> None:
    with LoopbackServer(app, http=protocol(http, per_client=2)) as server:
        stalled = [connect(server.port) for _ in range(2)]
        try:
            for sock in stalled:  # a head, then a body that stops coming
                sock.sendall(b"POST /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(TIMEOUT * 2)
            with connect(server.port) as real:
                real.sendall(GET)
                assert read_answer(real)[0] == 200
            assert read_until_closed(stalled[0])[1]  # the oldest made room
        finally:
            for sock in stalled:
                sock.close()


def test_the_caps_fit_in_the_descriptor_limit() -> None:
    assert connection_limits(10.0, 256, 1024, 4096) == ConnectionLimits(10.0, 256, 1024)
    assert connection_limits(10.0, 256, 1024, 256) == ConnectionLimits(10.0, 96, 96)  # macOS's default, not raised
    assert connection_limits(10.0, 256, 1024, None) == ConnectionLimits(10.0, 256, 1024)
