"""The proxy's pooled HTTP/1.1 client, against scripted servers on loopback that answer with exact bytes."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme

from llmpod.proxy._http import HTTPPool, UpstreamConnectionError, UpstreamReadTimeout

JSON = {"Content-Type": "application/json"}

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class ScriptedServer:
    """Accepts connections on 127.0.0.1; ``handler(reader, writer, n)`` answers the n-th request."""

    handler: Handler
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                await self.handler(reader, writer, len(self.requests))
                if writer.is_closing():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.disconnected.set()
            writer.close()


Start = Callable[..., Awaitable[ScriptedServer]]


@pytest.fixture
async def scripted_server() -> AsyncIterator[Start]:
    """``await scripted_server(handler, ssl_context=None)``: a server on a free port, closed after the test."""
    started: list[asyncio.Server] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> ScriptedServer:
        script = ScriptedServer(handler)
        script.server = await asyncio.start_server(script.serve, "127.0.0.1", 0, ssl=ssl_context)
        script.port = script.server.sockets[0].getsockname()[1]
        started.append(script.server)
        return script

    yield start
    for server in started:
        server.close()
        await server.wait_closed()


def pool_for(
    script: ScriptedServer, read_timeout: float = 5.0, scheme: str = "http", ssl_context: ssl.SSLContext | None = None
) -> HTTPPool:
    return HTTPPool(
        f"{scheme}://127.0.0.1:{script.port}", connect_timeout=5, read_timeout=read_timeout, ssl_context=ssl_context
    )


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def answer(writer: asyncio.StreamWriter, body: bytes, status: str = "200 OK", extra: bytes = b"") -> None:
    writer.write(b"HTTP/1.1 " + status.encode() + b"\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n" + body)


async def test_keeps_one_connection_alive_across_requests(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
            + chunked(b"data: %d\n\n" % n, b"data: [DONE]\n\n")
        )

    script = await scripted_server(handler)
    pool = pool_for(script)
    bodies = []
    for n in range(5):
        response = await pool.post("/v1/chat/completions", b'{"n": %d}' % n, JSON)
        assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
        bodies.append(await response.read())
        response.release()
    await pool.aclose()
    assert bodies == [b"data: %d\n\ndata: [DONE]\n\n" % n for n in range(1, 6)]
    assert script.connections == 1 and pool.connections_opened == 1
    first = script.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{script.port}\r\n".encode() in first and b"Content-Type: application/json" in first
    assert first.endswith(b'\r\n\r\n{"n": 0}')


async def test_body_arrives_piece_by_piece_as_the_server_sends_it(scripted_server: Start) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    script = await scripted_server(handler)
    pool = pool_for(script)
    response = await pool.post("/x", b"{}", JSON)
    assert await response.next_chunk() == b"first"  # before the server sent the rest
    release.set()
    assert await response.next_chunk() == b"second"
    assert await response.next_chunk() == b"" and response.complete
    response.release()
    await pool.aclose()


async def test_a_body_without_length_ends_with_the_connection(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    script = await scripted_server(handler)
    pool = pool_for(script)
    response = await pool.post("/x", b"{}", JSON)
    assert await response.read() == b"all of it"
    response.release()
    assert not pool._idle  # not reusable: the server said close
    await pool.aclose()


async def test_silence_before_the_headers_or_between_chunks_times_out(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\ndata\r\n")
        await asyncio.sleep(30)  # then nothing: cancelled when the test closes the server

    script = await scripted_server(handler)
    pool = pool_for(script, read_timeout=0.2)
    with pytest.raises(UpstreamReadTimeout):
        await pool.post("/x", b"{}", JSON)
    response = await pool.post("/x", b"{}", JSON)  # a new connection: the silent one was dropped
    assert await response.next_chunk() == b"data"
    with pytest.raises(UpstreamReadTimeout):
        await response.next_chunk()
    response.close()
    await pool.aclose()
    assert script.connections == 2


async def test_refused_connection_and_garbage_are_connection_errors(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    script = await scripted_server(handler)
    pool = pool_for(script)
    with pytest.raises(UpstreamConnectionError, match="invalid HTTP"):
        await pool.post("/x", b"{}", JSON)
    await pool.aclose()
    assert script.server is not None
    script.server.close()
    await script.server.wait_closed()
    refused = pool_for(script)
    with pytest.raises(UpstreamConnectionError):
        await refused.post("/x", b"{}", JSON)
    await refused.aclose()


async def test_cut_mid_body_is_an_error_not_a_short_body(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    script = await scripted_server(handler)
    pool = pool_for(script)
    response = await pool.post("/x", b"{}", JSON)
    assert await response.next_chunk() == b"only this"
    with pytest.raises(UpstreamConnectionError, match="closed the connection"):
        await response.next_chunk()
    response.close()
    await pool.aclose()


async def test_an_idle_connection_the_server_closed_is_replaced_without_losing_the_request(
    scripted_server: Start,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        answer(writer, b"ok %d" % n)
        if n == 1:  # like a keep-alive timeout firing the moment the client reuses the connection
            await writer.drain()
            writer.close()

    script = await scripted_server(handler)
    pool = pool_for(script)
    first = await pool.post("/x", b"{}", JSON)
    assert await first.read() == b"ok 1"
    first.release()
    idle = pool._idle[0]
    idle.closed = False  # as if the close had not been seen yet when the connection is taken again
    second = await pool.post("/x", b"{}", JSON)
    assert await second.read() == b"ok 2"
    second.release()
    await pool.aclose()
    assert script.connections == 2 and len(script.requests) == 2  # the request reached the server once


async def test_close_drops_the_connection_so_the_server_stops(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # until the client goes away

    script = await scripted_server(handler)
    pool = pool_for(script)
    response = await pool.post("/x", b"{}", JSON)
    assert await response.next_chunk() == b"first"
    response.close()
    await asyncio.wait_for(script.disconnected.wait(), 5)
    await pool.aclose()


async def test_a_slow_reader_gets_every_byte_of_a_large_body(scripted_server: Start) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: the client stops reading the socket past its buffer limit

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        answer(writer, payload)
        await writer.drain()

    script = await scripted_server(handler)
    pool = pool_for(script)
    response = await pool.post("/x", b"{}", JSON)
    received = bytearray()
    while piece := await response.next_chunk():
        received += piece
        await asyncio.sleep(0)
    assert bytes(received) == payload
    response.release()
    await pool.aclose()


async def test_https_upstream_verified_with_the_callers_ca(scripted_server: Start) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        answer(writer, b"over tls")

    script = await scripted_server(handler, server_context)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    pool = pool_for(script, scheme="https", ssl_context=trusting)
    response = await pool.post("/x", b"{}", JSON)
    assert await response.read() == b"over tls"
    response.release()
    await pool.aclose()

    stranger = pool_for(script, scheme="https", ssl_context=ssl.create_default_context())
    with pytest.raises(UpstreamConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await stranger.post("/x", b"{}", JSON)
    await stranger.aclose()


async def test_closed_and_cancelled_requests_leave_no_connection_behind(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
        await reader.read()  # until the client goes away: a stream cut short, then one that never answers

    script = await scripted_server(handler)
    pool = pool_for(script)
    cut = await pool.post("/x", b"{}", JSON)
    assert await cut.next_chunk() == b"first"
    cut.close()
    waiting = asyncio.ensure_future(pool.post("/x", b"{}", JSON))
    for _ in range(500):  # until the server holds the request (bounded: 5 s)
        if len(script.requests) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(script.requests) == 2
    waiting.cancel()  # every client left before the upstream answered
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not pool._busy and not pool._idle  # nothing kept: neither leaks memory nor a socket
    await pool.aclose()
    assert script.connections == 2


async def test_an_idle_connection_that_was_sent_stray_bytes_is_not_reused(scripted_server: Start) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        answer(writer, b"ok %d" % n)
        if n == 1:
            await writer.drain()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")  # nobody asked for this

    script = await scripted_server(handler)
    pool = pool_for(script)
    first = await pool.post("/x", b"{}", JSON)
    assert await first.read() == b"ok 1"
    first.release()
    for _ in range(500):  # until the stray answer has arrived (bounded: 5 s); the pool may drop the connection for it
        if not pool._idle or pool._idle[0].received_any:
            break
        await asyncio.sleep(0.01)
    second = await pool.post("/x", b"{}", JSON)
    assert await second.read() == b"ok 2"  # the second request's own answer, not the stray one
    second.release()
    await pool.aclose()
    assert script.connections == 2
