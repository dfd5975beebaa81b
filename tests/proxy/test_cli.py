"""``python3 proxy_fastapi.py`` as a user runs it: one-line errors with exit code 2, a clean start and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.proxy.test_app import chat
from tests.support.helpers import SHORT_MODEL
from tests.support.servers import LoopbackServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


def run_proxy(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "proxy_fastapi.py"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PROXY_PORT": "eighty"}, "PROXY_PORT='eighty'"),
        ({"MAX_CACHE_SIZE": "-5"}, "MAX_CACHE_SIZE='-5'"),
        ({"CACHE_SIZE_BYTES": "lots"}, "CACHE_SIZE_BYTES='lots'"),
        ({"RUNPOD_ENDPOINT": "pod-1234"}, "RUNPOD_ENDPOINT='pod-1234'"),
        ({"UPSTREAM_TIMEOUT": "-1"}, "UPSTREAM_TIMEOUT='-1'"),
        ({"ENABLE_PROFILING": "sometimes"}, "ENABLE_PROFILING='sometimes'"),
        ({"PROXY_HOST": "0.0.0.0"}, "PROXY_API_KEY"),
    ],
)
def test_bad_setting_is_one_line_and_exit_2(env: dict[str, str], named: str) -> None:
    result = run_proxy(env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr


def test_busy_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = run_proxy({"PROXY_PORT": str(taken.getsockname()[1])})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot listen" in result.stderr


@pytest.fixture
def proxy_process(mock_vllm: LoopbackServer, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    env = {
        **os.environ,
        "RUNPOD_ENDPOINT": f"{mock_vllm.url}/v1/chat/completions",
        "CACHE_DIR": str(tmp_path / "c"),
        "LOG_FILE": str(tmp_path / "proxy.log"),
        "UPSTREAM_API_KEY": "not-needed-by-the-mock-but-secret",
    }
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "proxy_fastapi.py"), "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_proxy_serves_and_stops_cleanly_on_sigterm(
    proxy_process: tuple[subprocess.Popen[str], int], tmp_path: Path
) -> None:
    process, port = proxy_process
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "healthy"
    first = httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=20)
    second = httpx.post(f"{base}/v1/chat/completions", json={**chat(), "model": SHORT_MODEL.upper()}, timeout=20)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    with open(f"/proc/{process.pid}/cmdline", "rb") as cmdline:
        assert b"secret" not in cmdline.read()  # keys travel in the environment, never on the command line
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=15)
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful stop
    assert "Traceback" not in stderr
    log = (tmp_path / "proxy.log").read_text()
    assert "proxy stopped after 2 requests" in log
    assert "cache=HIT" in log and "not-needed-by-the-mock-but-secret" not in log + stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
