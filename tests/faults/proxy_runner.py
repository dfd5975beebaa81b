"""The proxy and the mock vLLM server as processes, started as users start them, for the tests that kill one
or measure its memory and file descriptors. ``bench/servers.py`` does the starting (a free port, a bounded wait
for /health, SIGTERM then SIGKILL on stop); this adds the settings the tests use and what they sample."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.servers import ServerProcess, base_env
from tests.support.helpers import SERVED_MODEL

ROOT = Path(__file__).resolve().parents[2]


def proxy_process(
    log_dir: Path, upstream: str, cache_dir: Path, name: str, *, upstream_timeout: float = 10.0
) -> ServerProcess:
    """``proxy_fastapi.py`` in front of ``upstream`` (a base URL without ``/v1``)."""
    env = base_env(
        {
            "RUNPOD_ENDPOINT": f"{upstream}/v1",
            "CACHE_DIR": str(cache_dir),
            "UPSTREAM_TIMEOUT": str(upstream_timeout),
            "LOG_FILE": str(log_dir / f"{name}.requests.log"),
        }
    )
    return ServerProcess(
        name,
        [sys.executable, str(ROOT / "proxy_fastapi.py"), "--port", "{port}"],
        env,
        log_dir / f"{name}.log",
        start_timeout=60,
    )


def mock_process(log_dir: Path, name: str, *switches: str) -> ServerProcess:
    """``mock_vllm_server.py`` serving SERVED_MODEL with ``switches`` (its command-line flags)."""
    argv = [
        sys.executable,
        str(ROOT / "mock_vllm_server.py"),
        "--port",
        "{port}",
        "--model",
        SERVED_MODEL,
        "--max-model-len",
        "4096",
        *switches,
    ]
    return ServerProcess(name, argv, base_env({}), log_dir / f"{name}.log", start_timeout=60)


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Started for the block, stopped (and reaped) however it ends."""
    try:
        server.start()
        yield server
    finally:
        server.stop()


def open_fds(pid: int) -> tuple[int, int]:
    """(TCP connections, every other descriptor) of a process. Connections come and go with the clients and the
    connection pools, and a pooled idle connection the server has closed stays half closed (CLOSE_WAIT) until the
    pool next looks at it, so they can only be bounded; everything else (files, listeners, pipes, sockets in
    any other state) should not grow."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] in ("01", "08"):  # TCP_ESTABLISHED, TCP_CLOSE_WAIT
                established.add(fields[9])
    connections = other = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:[") and target[8:-1] in established:
            connections += 1
        else:
            other += 1
    return connections, other


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
