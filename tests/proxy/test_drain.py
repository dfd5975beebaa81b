"""SIGTERM with requests in flight (llmpod/proxy/drain.py): the proxy as a user runs it, in front of a slow mock.

One run covers every case: a stream that finishes within PROXY_DRAIN_SECONDS is delivered whole and cached; a
stream that outlasts it gets an OpenAI-shaped error event, ``[DONE]`` and a clean end; a plain request that outlasts
it gets an OpenAI-shaped JSON 503; an idle keep-alive connection is closed at once and new connections are refused;
the process exits within the drain plus a margin, with no traceback, no upstream generation left and its port free.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from llmpod.proxy.drain import Drain, DrainingServer
from llmpod.proxy.sse import DONE, SSEParser
from llmpod.proxy_settings import DRAIN_SECONDS, STOP_MARGIN_SECONDS, proxy_stop_grace
from tests.faults.hostile import ERROR_FIELDS, proxy_process
from tests.support.helpers import SERVED_MODEL, MockControl, wait_until
from tests.support.servers import LoopbackServer

GRACE = 3.0  # PROXY_DRAIN_SECONDS for the proxy under test
EXIT_MARGIN = 10.0  # generous: a loaded 2-core box; the bound is about hanging, not speed
CHUNK_DELAY = 0.05
SHORT_TOKENS = 20  # ~1 s of chunks: ends well within GRACE
LONG_TOKENS = 1000  # ~50 s of chunks: outlasts it


@pytest.fixture
def mock_vllm_settings() -> dict[str, object]:
    return {"chunk_delay": CHUNK_DELAY, "chunk_count": LONG_TOKENS}


def _chat(prompt: str, tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "stream": stream,
    }


class Call(threading.Thread):
    """One request in a thread of its own: what came back, and when the first bytes did."""

    def __init__(self, base: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.base, self.body = base, body
        self.first_bytes = threading.Event()
        self.status = 0
        self.content_type = ""
        self.content = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=60) as http,
                http.stream("POST", f"{self.base}/v1/chat/completions", json=self.body) as response,
            ):
                self.status, self.content_type = response.status_code, response.headers.get("content-type", "")
                for piece in response.iter_raw():
                    self.content += piece
                    self.first_bytes.set()
        except BaseException as exc:  # a cut stream: httpx says the body ended early
            self.error = exc
        finally:
            self.first_bytes.set()

    def events(self) -> list[bytes]:
        return SSEParser().feed(self.content)


def _lines(path: Path, word: str) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if word in line]


def _openai_error(payload: bytes, code: int) -> dict[str, Any]:
    error = json.loads(payload)["error"]
    assert set(error) == ERROR_FIELDS and error["code"] == code and "shutting down" in error["message"], error
    return error  # type: ignore[no-any-return]


def _answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer (head and Content-Length body) from ``sock``, leaving the connection open."""
    received = b""
    while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < _length(received):
        piece = sock.recv(65536)
        assert piece, f"closed mid-answer: {received!r}"
        received += piece
    return received


def _length(received: bytes) -> int:
    for line in received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
def drained_proxy(mock_vllm: LoopbackServer, tmp_path: Path) -> Iterator[Any]:
    server = proxy_process(tmp_path, f"{mock_vllm.url}/v1", PROXY_DRAIN_SECONDS=str(GRACE))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_drains_then_ends_streams_and_plain_requests_cleanly(
    drained_proxy: Any, mock_vllm: LoopbackServer, tmp_path: Path, stop: signal.Signals
) -> None:
    server, mock = drained_proxy, MockControl(mock_vllm.url)
    process = server.process
    long_stream = Call(server.url, _chat("long stream", LONG_TOKENS, stream=True))
    long_plain = Call(server.url, _chat("long plain", LONG_TOKENS, stream=False))
    short_stream = Call(server.url, _chat("short stream", SHORT_TOKENS, stream=True))
    for call in (long_stream, long_plain):
        call.start()
    wait_until(lambda: mock.stats()["in_flight"] == 2, "both long requests generating upstream")
    assert long_stream.first_bytes.wait(30)
    short_stream.start()
    assert short_stream.first_bytes.wait(30) and not short_stream.content.endswith(b"[DONE]\n\n")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _answer(idle).startswith(b"HTTP/1.1 200")

    sent = time.monotonic()
    process.send_signal(stop)

    # an idle keep-alive connection is closed at once, and nothing new is accepted, while the drain goes on
    idle.settimeout(GRACE * 0.9)
    assert idle.recv(65536) == b""
    idle.close()
    refused = False
    while not refused and time.monotonic() - sent < GRACE * 0.9:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            time.sleep(0.02)
        except ConnectionRefusedError:
            refused = True
    assert refused and long_stream.is_alive(), "new connections must be refused during the drain"

    process.wait(timeout=GRACE + EXIT_MARGIN)
    elapsed = time.monotonic() - sent
    assert GRACE <= elapsed <= GRACE + EXIT_MARGIN, elapsed
    assert process.returncode in (0, -stop)  # uvicorn re-raises the signal after its shutdown (0: it was ignored)
    for call in (long_stream, long_plain, short_stream):
        call.join(10)
        assert not call.is_alive()

    # (a) finished within the drain: whole, no error
    events = short_stream.events()
    assert short_stream.error is None and short_stream.status == 200
    assert events[-1] == DONE and not any(b'"error"' in event for event in events)
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    # (b) outlasted it: an OpenAI error event, [DONE], and a body that ends cleanly (httpx raises on a cut one)
    events = long_stream.events()
    assert long_stream.error is None, repr(long_stream.error)
    assert events[-1] == DONE and len(events) > 2
    _openai_error(events[-2], 503)
    # (c) a plain request that outlasted it: an OpenAI-shaped JSON 503, never text/plain
    assert long_plain.error is None and long_plain.status == 503
    assert long_plain.content_type.startswith("application/json")
    _openai_error(long_plain.content, 503)
    # (d) no traceback anywhere
    for log in (server.log_path, tmp_path / "proxy_requests.log"):
        text = log.read_text(errors="replace") if log.exists() else ""
        assert "Traceback" not in text and "Exception in ASGI" not in text, text[-2000:]
    # the request log says what each client got (503, not 499: no client left)
    statuses = [line.split(" status=")[1].split()[0] for line in _lines(tmp_path / "proxy_requests.log", " status=")]
    assert sorted(statuses) == ["200", "503", "503"]
    # (e) no generation left upstream, nobody listening on the port (closed connections may linger in TIME_WAIT,
    # which SO_REUSEADDR lets a new listener pass, as the proxy's own does)
    wait_until(lambda: mock.stats()["in_flight"] == 0, "the interrupted generations cancelled upstream", 10)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))
        probe.listen()

    # only the answer completed during the drain was cached
    server.start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        listed = http.get("/debug/cache").json()
        assert [entry["preview"] for entry in listed["entries"]] == ["short stream"]
        again = http.post("/v1/chat/completions", json=_chat("short stream", SHORT_TOKENS, stream=True))
        assert again.headers["x-cache"] == "HIT"


def test_pod_manager_waits_out_the_drain() -> None:
    # manage_pod.py SIGKILLs the proxy only after its drain and the margin to end and flush (sidecars.py)
    assert proxy_stop_grace(None) == DRAIN_SECONDS + STOP_MARGIN_SECONDS == 10.0
    assert proxy_stop_grace("60") == 60 + STOP_MARGIN_SECONDS
    assert proxy_stop_grace("junk") == proxy_stop_grace("nan") == proxy_stop_grace(None)


def test_the_uvicorn_hook_still_exists() -> None:
    # the drain starts from uvicorn's Server.shutdown(sockets); an upgrade that renames it must fail here, loudly
    assert inspect.iscoroutinefunction(uvicorn.Server.shutdown)
    assert list(inspect.signature(uvicorn.Server.shutdown).parameters) == ["self", "sockets"]
    assert DrainingServer.shutdown is not uvicorn.Server.shutdown
    assert hasattr(uvicorn.Server, "force_exit") or "force_exit" in inspect.getsource(uvicorn.Server.__init__)


# ------------------------------------------------------------------------------------------ Drain in-process
def _hanging_app(*messages: Message) -> Any:
    """An ASGI app that sends ``messages``, then waits for ever (an answer still being generated)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for message in messages:
            await send(message)
        await asyncio.Event().wait()

    return app


async def _drained(app: Any, *, begin_first: bool = False) -> list[Message]:
    """What one request to ``app`` behind a ``Drain`` of 0.05 s sends, the drain begun while it is in flight (or,
    ``begin_first``, before it arrives)."""
    drain, sent = Drain(app, 0.05), []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    if begin_first:
        drain.begin()
    task = asyncio.create_task(drain({"type": "http", "method": "POST", "path": "/"}, receive, send))
    await asyncio.sleep(0.01)
    drain.begin()
    await asyncio.wait_for(task, 5)
    return sent


SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream")],
}


def _body(sent: list[Message]) -> bytes:
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")  # a clean end
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_drain_ends_a_stream_with_an_error_event_unless_it_already_said_done() -> None:
    chunk = b'data: {"choices": []}\n\n'
    sent = await _drained(_hanging_app(SSE_START, {"type": "http.response.body", "body": chunk, "more_body": True}))
    events = SSEParser().feed(_body(sent))
    assert events[0] == chunk[6:-2] and events[-1] == DONE and len(events) == 3
    _openai_error(events[1], 503)
    # an answer whose [DONE] went out but not its end (a cached stream sent in one piece) is ended, nothing added
    done = {"type": "http.response.body", "body": chunk + b"data: [DONE]\n\n", "more_body": True}
    assert _body(await _drained(_hanging_app(SSE_START, done))) == chunk + b"data: [DONE]\n\n"


async def test_drain_answers_what_has_not_started_with_a_json_503() -> None:
    for begin_first, retry in ((False, None), (True, b"1")):  # in flight; or arriving during the drain (pipelined)
        sent = await _drained(_hanging_app(), begin_first=begin_first)
        start, body = sent[0], _body(sent)
        assert start["status"] == 503 and (b"content-type", b"application/json") in start["headers"]
        assert dict(start["headers"]).get(b"retry-after") == retry
        assert json.loads(body)["error"]["code"] == 503


async def test_a_cancellation_that_is_not_the_drains_goes_through() -> None:
    drain = Drain(_hanging_app(), 60)

    async def send(message: Message) -> None:
        raise AssertionError(message)

    task = asyncio.create_task(drain({"type": "http"}, _never, send))
    await asyncio.sleep(0.01)
    task.cancel()  # the client left, a send deadline, uvicorn's backstop
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not drain._requests


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError
