"""Hostile connections to the proxy process (issue 16, "Robustness"): slowloris under macOS's descriptor budget,
and a stalled reader's connection after the send timeout cuts it. Counts go to the fault ledger ("hostile neighbour").

The proxy runs as users run it (``proxy_fastapi.py``: uvloop, httptools, the guard of
llmpod/proxy/connections.py), under a hard limit of 256 open descriptors, macOS's default for a process started
from a terminal; the deadlines are set to a second so that the test takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.servers import ServerProcess, base_env
from tests.faults.hostile import ROOT
from tests.faults.ledger import FaultLedger
from tests.support.helpers import SERVED_MODEL
from tests.support.servers import LoopbackServer

AREA = "hostile neighbour"
FD_LIMIT = 256  # macOS's default soft limit (ulimit -n) for a process started from a terminal
SLOW_CLIENTS = 600  # well above the caps the proxy can afford under that limit, and above the limit itself
HEADER_TIMEOUT = 1.0
BOUND = 15.0  # seconds within which every slow connection must have been closed (the deadline is 1 s)
# run proxy_fastapi.py under a hard descriptor limit, so that it cannot raise it (macOS's hard limit is higher, but
# a proxy that could not raise its limit must still hold out)
LIMITED = (
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture
def mock_vllm_settings() -> dict[str, object]:
    # a long answer (megabytes of SSE) so that a client that stops reading fills the socket buffers
    return {"chunk_count": 80_000, "max_model_len": 1_000_000}


@pytest.fixture
def limited_proxy(mock_vllm: LoopbackServer, tmp_path: Path) -> Iterator[ServerProcess]:
    settings = {
        "RUNPOD_ENDPOINT": f"{mock_vllm.url}/v1",
        "CACHE_DIR": str(tmp_path / "proxy_cache"),
        "LOG_FILE": str(tmp_path / "proxy_requests.log"),
        "UPSTREAM_TIMEOUT": "20",
        "PROXY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "PROXY_SEND_TIMEOUT": "1",
    }
    argv = [sys.executable, "-c", LIMITED, str(ROOT / "proxy_fastapi.py"), "--port", "{port}"]
    server = ServerProcess("proxy", argv, base_env(settings), tmp_path / "proxy_process.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    """This test process holds the slow clients' ends: it needs more descriptors than the proxy may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def holds_connection(pid: int, server_port: int, client_port: int) -> bool:
    """Whether process ``pid`` still has a descriptor for the TCP connection server_port <-> client_port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if (local, remote) == (server_port, client_port):
                inodes.add(f"socket:[{fields[9]}]")
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) in inodes:
                return True
    return False


def real_request(url: str, notes: list[str], when: str) -> int:
    """One request of a real client on a fresh connection: 0 if answered 200 promptly, else 1 (noted)."""
    try:
        with httpx.Client(timeout=5.0) as client:
            status = client.get(f"{url}/v1/models").status_code
    except httpx.HTTPError as exc:
        notes.append(f"a real client {when}: {type(exc).__name__}")
        return 1
    if status != 200:
        notes.append(f"a real client {when}: {status}")
        return 1
    return 0


def close_all_seen(socks: list[socket.socket], bound: float) -> int:
    """Wait until the server has closed every socket (EOF or reset) or ``bound`` passes; how many it closed."""
    closed = 0
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + bound
        while closed < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    closed += 1
    return closed


def test_slow_headers_never_lock_out_a_real_client(limited_proxy: ServerProcess, fault_ledger: FaultLedger) -> None:
    proxy = limited_proxy
    notes: list[str] = []
    dirty = real_request(proxy.url, notes, "before")
    fds_before = open_fds(proxy.pid)
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
            slow.append(sock)
        fds_during = open_fds(proxy.pid)
        for attempt in range(3):
            dirty += real_request(proxy.url, notes, f"while {SLOW_CLIENTS} slow heads are open ({attempt + 1})")
        closed = close_all_seen(slow, BOUND)
        if closed < len(slow):
            dirty += 1
            notes.append(f"{len(slow) - closed} of {len(slow)} slow connections still open after {BOUND:.0f} s")
    finally:
        for sock in slow:
            sock.close()
    dirty += real_request(proxy.url, notes, "after")
    time.sleep(0.5)
    fds_after = open_fds(proxy.pid)
    print(f"proxy descriptors: {fds_before} before, {fds_during} with {SLOW_CLIENTS} slow heads, {fds_after} after")
    if fds_during >= FD_LIMIT - 8 or fds_after > fds_before + 4:
        dirty += 1
        notes.append(f"descriptors {fds_before} -> {fds_during} -> {fds_after} (limit {FD_LIMIT})")
    if not proxy.alive():
        dirty += 1
        notes.append("the proxy died")
    fault_ledger.record(
        AREA,
        f"slowloris: {SLOW_CLIENTS} connections that never finish their request head, {FD_LIMIT} descriptors",
        injected=SLOW_CLIENTS,
        attacks_worked=dirty,  # a real client locked out, or descriptors held: what the attack is after
        notes=notes,
    )


def test_a_stalled_readers_connection_is_dropped_with_its_answer(
    limited_proxy: ServerProcess, fault_ledger: FaultLedger
) -> None:
    proxy = limited_proxy
    notes: list[str] = []
    dirty = 0
    body = json.dumps(
        {
            "model": SERVED_MODEL,
            "messages": [{"role": "user", "content": "stall me"}],
            "max_tokens": 80_000,
            "stream": True,
        }
    ).encode()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", proxy.port))
    client_port = stalled.getsockname()[1]
    try:
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert stalled.recv(1024).startswith(b"HTTP/1.1 200")  # then reads nothing more, and does not leave
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            deadline = time.monotonic() + BOUND
            while client.get("/metrics").json()["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.1)
        deadline = time.monotonic() + 5  # the cut is logged, then the connection goes within moments
        while holds_connection(proxy.pid, proxy.port, client_port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if holds_connection(proxy.pid, proxy.port, client_port):
            dirty += 1
            notes.append("the proxy still holds the stalled client's connection after cutting its answer")
        if close_all_seen([stalled], 10.0) != 1:
            dirty += 1
            notes.append("the stalled client never sees its connection end")
    finally:
        stalled.close()
    fault_ledger.record(
        AREA,
        "a client that stops reading a long stream: connection dropped after PROXY_SEND_TIMEOUT",
        injected=1,
        attacks_worked=dirty,  # a real client locked out, or descriptors held: what the attack is after
        notes=notes,
    )
