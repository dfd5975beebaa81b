from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

import llmpod.proxy._cache_files
import llmpod.proxy.cache
from llmpod.proxy_settings import ENV_NAMES
from tests.support.helpers import SERVED_MODEL, HeldScan, MockControl, ProxyFactory
from tests.support.servers import LoopbackServer

if TYPE_CHECKING:
    from tests.support.e2e_harness import FakeRunPod, Workdir

# Every variable our programs read. Tests start from none of them, so a developer's shell (a real
# RUNPOD_API_KEY, a CACHE_DIR in /tmp) can never leak into a test or be touched by one.
OUR_ENV_VARS = (
    *ENV_NAMES.values(),  # the proxy's settings, whatever they grow to (the settings contract)
    "RUNPOD_API_KEY",
    "RUNPOD_API_BASE",
    "RUNPOD_POD_URL_TEMPLATE",
    "HF_API_BASE",
    "VLLM_API_KEY",
    "MODEL_NAME",
    "PORT",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name in OUR_ENV_VARS or name.startswith("MOCK_"):
            monkeypatch.delenv(name, raising=False)
    # Anything that forgets to pass an explicit path still lands in the test's own directory.
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "default_cache"))
    monkeypatch.setenv("LOG_FILE", str(tmp_path / "default_proxy.log"))
    yield


@pytest.fixture(autouse=True, scope="session")
def interruptible_children() -> Iterator[None]:
    """A shell that starts the suite in the background (``pytest &`` in a script) makes it ignore SIGINT, and
    every manage_pod.py it starts would inherit that: the Ctrl-C tests would test the shell, not the product.
    With a handler here instead, the children start with SIGINT's default, as from a terminal."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------------------
# Real servers on loopback: the mock vLLM server and the proxy in front of it.


@pytest.fixture
def mock_vllm_settings() -> dict[str, object]:
    """Override in a test module (or parametrize) to start the mock with other switches."""
    return {}


@pytest.fixture
def mock_vllm(mock_vllm_settings: dict[str, object]) -> Iterator[LoopbackServer]:
    """A vLLM-faithful mock serving SERVED_MODEL on 127.0.0.1 and a free port."""
    from llmpod.mock.server import MockSettings, create_app

    settings = MockSettings(**{"model": SERVED_MODEL, "max_model_len": 4096, **mock_vllm_settings})
    with LoopbackServer(create_app(settings)) as server:
        yield server


@pytest.fixture
def mock_control(mock_vllm: LoopbackServer) -> MockControl:
    return MockControl(mock_vllm.url)


@pytest.fixture
def start_proxy(tmp_path: Path, mock_vllm: LoopbackServer) -> Iterator[ProxyFactory]:
    """Start proxies (stopped at teardown) in front of the mock; keyword arguments override settings."""
    from llmpod.proxy.app import create_app
    from llmpod.proxy.settings import ProxySettings

    started: list[LoopbackServer] = []

    def start(**overrides: Any) -> LoopbackServer:
        values: dict[str, Any] = {
            "upstream_url": f"{mock_vllm.url}/v1/chat/completions",
            "cache_dir": tmp_path / "cache",
            "log_file": tmp_path / "proxy.log",
            "upstream_timeout": 10.0,
            **overrides,
        }
        server = LoopbackServer(create_app(ProxySettings(**values))).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def proxy(start_proxy: ProxyFactory) -> LoopbackServer:
    return start_proxy()


@pytest.fixture
def client(proxy: LoopbackServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        yield http


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join(timeout=5)
    for conn in accepted:
        conn.close()
    listener.close()


# ---------------------------------------------------------------------------------------------------------
# manage_pod.py end to end: the fake RunPod API as a process, and a directory to run manage_pod.py in.


@pytest.fixture(scope="session")
def shared_fake_runpod() -> Iterator[FakeRunPod]:
    from tests.support.e2e_harness import running_fake_runpod

    with running_fake_runpod() as fake:
        yield fake


@pytest.fixture
def fake_runpod(shared_fake_runpod: FakeRunPod) -> Iterator[FakeRunPod]:
    """One fake RunPod process for the run (starting one costs about a second), reset before each test to how
    it started: its settings, no pods (their mock vLLM servers stopped), no calls. The test fails if any request
    to it, or any answer from it, broke the official RunPod spec (tests/fakes/runpod_spec.py)."""
    httpx.post(f"{shared_fake_runpod.url}/fake/reset", timeout=30).raise_for_status()
    yield shared_fake_runpod
    shared_fake_runpod.assert_spec_kept()


@pytest.fixture
def workdir(tmp_path: Path, fake_runpod: FakeRunPod) -> Iterator[Workdir]:
    """A directory with a pod_config.json pointing at the fake; whatever a test leaves running is shut down
    after it, and the test fails if any helper process of the directory outlived that shutdown."""
    from tests.support.e2e_harness import Workdir, cleanup

    work = Workdir(tmp_path, fake_runpod)
    yield work
    cleanup(work)


# ------------------------------------------------------------------------------- the cache's start-up scan
@pytest.fixture
def held_scan(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldScan]:
    scan = HeldScan()
    monkeypatch.setattr(llmpod.proxy.cache, "index_of", scan.index_of)  # the proxies of start_proxy too
    yield scan
    scan.release()  # a test that failed before its release leaves no thread waiting
