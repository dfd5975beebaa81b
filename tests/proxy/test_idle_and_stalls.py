"""What keeps a pod billing, and HTTP/1.0 clients (issue 16: "The bill", "Robustness").

Only successful generation work is activity for idle shutdown (``last_request_at`` in /metrics, read by the
watchdog); a client that stopped reading its stream is cut after ``send_timeout``; an HTTP/1.0 client never gets
chunked encoding. Real loopback servers (the stall needs real socket buffers; HTTP/1.0 framing is the server's).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpod.proxy.app import create_app
from llmpod.proxy.settings import ProxySettings
from tests.support.helpers import SERVED_MODEL, ProxyFactory
from tests.support.servers import LoopbackServer


def chat(content: str = "Say hello", **extra: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 20, **extra}


def test_failing_requests_and_polls_are_not_activity(client: httpx.Client) -> None:
    bad = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert client.post("/v1/chat/completions", json={"model": SERVED_MODEL}).status_code == 400
    assert client.post("/v1/chat/completions", json=chat(model="no-such-model")).status_code == 404
    client.get("/health")
    client.get("/v1/models")
    metrics = client.get("/metrics").json()
    assert metrics["requests_total"] >= 2
    assert metrics["last_request_at"] is None  # nothing a malformed-POST loop does keeps the pod alive

    before = time.time()
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert client.get("/metrics").json()["last_request_at"] >= before
    client.post("/v1/chat/completions", json=chat(stream=True))  # a streamed hit delivered: activity too
    assert client.get("/metrics").json()["last_request_at"] >= before


@pytest.fixture
def mock_vllm_settings() -> dict[str, object]:
    # a long answer (megabytes of SSE) so that a client that stops reading fills the socket buffers
    return {"chunk_count": 80_000, "max_model_len": 1_000_000}


def test_a_client_that_stops_reading_a_stream_is_cut(start_proxy: ProxyFactory) -> None:
    proxy = start_proxy(send_timeout=0.5)
    body = json.dumps(chat("stall me", stream=True, max_tokens=80_000)).encode()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", proxy.port))
    try:
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert stalled.recv(1024).startswith(b"HTTP/1.1 200")  # then reads nothing more, and does not leave
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            deadline = time.monotonic() + 15
            metrics = client.get("/metrics").json()
            while metrics["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.1)
                metrics = client.get("/metrics").json()
            assert metrics["in_flight"] == 0  # abandoned: no longer holds the pod awake
            assert metrics["last_request_at"] is None  # an answer nobody got is not activity
            # the flight was released: a new client gets the answer (generated or stored), not a wait
            answer = client.post("/v1/chat/completions", json=chat("stall me", max_tokens=80_000))
            assert answer.status_code == 200
    finally:
        stalled.close()


def raw_exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request``, read until the server closes; (head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("stream", [True, False])
def test_an_http_1_0_client_never_gets_chunked(
    mock_vllm: LoopbackServer, tmp_path: Path, stream: bool, mock_vllm_settings: dict[str, object]
) -> None:
    settings = ProxySettings(
        upstream_url=f"{mock_vllm.url}/v1", cache_dir=tmp_path / "cache", log_file=None, upstream_timeout=10.0
    )
    payload = json.dumps(chat("old client", stream=stream, max_tokens=20)).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    with LoopbackServer(create_app(settings), http="httptools") as proxy:  # production's HTTP implementation
        for _ in range(2):  # a miss, then a hit
            head, body = raw_exchange(proxy.port, request)
            lines = head.lower().split(b"\r\n")
            assert lines[0].startswith(b"http/1.") and b" 200 " in lines[0]
            assert not any(line.startswith(b"transfer-encoding") for line in lines)
            length = [int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")]
            assert length == [len(body)]
            if stream:
                assert body.rstrip().endswith(b"data: [DONE]")
            else:
                assert json.loads(body)["choices"][0]["message"]["content"]
