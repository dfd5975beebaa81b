"""Helpers shared by the tests (imported from here, not from conftest.py, which keeps only fixtures)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

import llmpod.proxy._cache_files
import llmpod.proxy.cache
from tests.support.servers import LoopbackServer

SERVED_MODEL = "TheBloke/deepseek-coder-33B-instruct-AWQ"
SHORT_MODEL = "deepseek-coder-33b-awq"


class MockControl:
    """Test-side handle on the mock's /mock routes."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/mock/stats", timeout=5).json()  # type: ignore[no-any-return]

    def generations(self) -> int:
        requests = self.stats()["requests"]
        return int(requests.get("chat.completions", 0)) + int(requests.get("completions", 0))

    def configure(self, **switches: Any) -> None:
        httpx.post(f"{self.url}/mock/config", json=switches, timeout=5).raise_for_status()


ProxyFactory = Callable[..., LoopbackServer]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0, interval: float = 0.01) -> None:
    """Poll ``condition`` until it holds, within a bound (never a fixed sleep): a cache write lands just after
    the answer, a watchdog acts on its next round, a fake pod changes phase on its own clock."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not the case within {timeout}s")
        time.sleep(interval)


def wait_for_stored(http: httpx.Client, entries: int, base: str = "") -> None:
    """Wait until the proxy's cache index holds ``entries`` answers (they are written after the reply)."""
    wait_until(lambda: http.get(f"{base}/metrics").json()["cache_entries"] >= entries, f"{entries} answers stored")


class HeldScan:
    """Stands in for the start-up scan's thread work and holds its result until ``release``: what happens
    meanwhile is what a proxy serving during its first second sees. The files are looked at first (the stats
    predate what the test does next), or with ``look_late``, after the release. Scans started while ``armed``
    is off are not held."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.scanning = threading.Event()
        self.look_late = False
        self.armed = True

    def index_of(self, directory: str, names: list[str]) -> Any:
        if not self.armed:
            return llmpod.proxy._cache_files.index_of(directory, names)
        found = None if self.look_late else llmpod.proxy._cache_files.index_of(directory, names)
        self.scanning.set()
        assert self.gate.wait(timeout=10), "the test never released the scan"
        return llmpod.proxy._cache_files.index_of(directory, names) if found is None else found

    def release(self) -> None:
        self.gate.set()

    async def start(self, cache: llmpod.proxy.cache.ResponseCache) -> asyncio.Task[None]:
        """``cache.load_behind()``, returned once the scan has looked at the files."""
        loading = cache.load_behind()
        assert await asyncio.to_thread(self.scanning.wait, 10), "the scan never started"
        return loading
