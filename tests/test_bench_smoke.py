"""The benchmark runs end to end with its smallest settings, prints its table, writes its JSON, and leaves
no server, port or temp directory behind. No timing assertions: the figures are the benchmark's business."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from bench.servers import floor_server, mock_server

ROOT = Path(__file__).resolve().parents[1]


def _processes_with(marker: str) -> list[int]:
    """Pids whose environment mentions ``marker`` (every server the benchmark starts inherits its TMPDIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_benchmark_smoke(tmp_path: Path) -> None:
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    out = tmp_path / "bench.json"
    env = {**os.environ, "TMPDIR": str(temp_root)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_proxy.py"),
            "--quick",
            "--duration",
            "0.5",
            "--rounds",
            "1",
            "--only",
            "hits,coalescing",
            "--entries",
            "200",
            "--coalesce-clients",
            "20",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| metric" in result.stdout and "cache hit req/s" in result.stdout, result.stdout
    assert "upstream calls" in result.stdout, result.stdout

    data = json.loads(out.read_text())
    assert data["errors"] == {}
    hits = data["sections"]["hits"]["scenarios"]["hits"]["median"]
    for clients in ("1", "16"):
        assert hits[clients]["rps"] > 0
        assert hits[clients]["p50_ms"] > 0
    coalescing = data["sections"]["coalescing"]["runs"]
    assert len(coalescing) == 1 and coalescing[0]["statuses"] == {"200": 20}
    assert isinstance(coalescing[0]["upstream_calls_mock"], int)
    assert {t["section"] for t in data["targets"]} >= {"hits", "coalescing"}

    # nothing left behind: no process, no listening port, no temp directory
    assert _processes_with(str(temp_root)) == []
    assert data["ports"] and not any(_listening(port) for port in data["ports"])
    assert list(temp_root.iterdir()) == []


@pytest.mark.slow
def test_the_floor_forwards_plain_and_streamed_answers(tmp_path: Path) -> None:
    """The miss floor the benchmark measures beside the proxy asks the mock for a stream, as the proxy does, and
    answers a plain request with the stream's last event, a streamed one with every event as it came."""
    mock = mock_server("mock", tmp_path)
    floor = None
    try:
        mock.start()
        floor = floor_server("floor", tmp_path, mock)  # it is told the mock's port, known once started
        floor.start()
        body = {"model": "m", "messages": [{"role": "user", "content": "floor check"}], "max_tokens": 8}
        plain = httpx.post(f"{floor.url}/v1/chat/completions", content=orjson.dumps(body), timeout=10)
        assert plain.status_code == 200
        assert plain.json()["usage"]["completion_tokens"] > 0  # the include_usage chunk the floor asked for
        stats = httpx.get(f"{mock.url}/mock/stats", timeout=10).json()
        assert stats["streams"] == 1 and stats["last_request"]["body"]["stream"] is True
        streamed = httpx.post(
            f"{floor.url}/v1/chat/completions", content=orjson.dumps({**body, "stream": True}), timeout=10
        )
        assert streamed.status_code == 200
        assert streamed.headers["content-type"] == "text/event-stream"
        events = [e for e in streamed.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 3
    finally:
        if floor is not None:
            floor.stop()
        mock.stop()
