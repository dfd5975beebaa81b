"""Clients that stop reading large answers, against the proxy process's memory (issue 16, "Robustness"). Counts go
to the fault ledger ("hostile neighbour").

The issue's measure: 30 clients that send a request for a 20 MB cached answer and then read nothing took the proxy
from 61 to 798 MB. Here the same, plus 30 stalled listeners of one coalesced generation; a client that reads is
served whole meanwhile. An attack that worked: memory grown past a bound of tens of MB, or the reader not served.
The scenarios and helpers are tests/proxy/test_large_answers.py's.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.faults.hostile import proxy_process, rss_mib
from tests.faults.ledger import FaultLedger
from tests.proxy.test_large_answers import (
    GROWTH_BOUND_MIB,
    READ_BOUND,
    HeldUpstream,
    big_entry,
    chat,
    peak_growth,
    plant,
    sse,
    stall,
    warm_up,
)
from tests.support.servers import LoopbackServer

AREA = "hostile neighbour"
STALLED = 30


@pytest.fixture
def upstream() -> Iterator[tuple[HeldUpstream, LoopbackServer]]:
    held = HeldUpstream(events=5_000)  # a 10 MB generation, held halfway until released
    with LoopbackServer(held.app()) as server:
        yield held, server
        held.release.set()


# soak: the full fault run counts it; the default run has the same behaviour in tests/proxy/test_large_answers.py
@pytest.mark.soak
def test_stalled_readers_of_large_answers_do_not_grow_memory(
    tmp_path: Path, upstream: tuple[HeldUpstream, LoopbackServer], fault_ledger: FaultLedger
) -> None:
    held, server_of_upstream = upstream
    key, entry = big_entry("a 20 MB cached answer", events=4_700)
    size = plant(tmp_path / "proxy_cache", key, entry)
    proxy = proxy_process(tmp_path, f"{server_of_upstream.url}/v1", UPSTREAM_KIND="vllm")
    proxy.start()
    notes: list[str] = []
    worked = 0
    stalled: list[socket.socket] = []
    try:
        # 1. the case: stalled readers of a large cached answer, half of them streamed
        before = warm_up(proxy)  # answered at once, short
        for i in range(STALLED):
            stalled.append(stall(proxy.port, chat("a 20 MB cached answer", stream=i % 2 == 0)))
        for sock in stalled:
            sock.recv(12)
        growth = peak_growth(proxy.pid, before)
        fast = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("a 20 MB cached answer"), timeout=READ_BOUND)
        if fast.content != orjson.dumps(entry.response):
            worked += 1
            notes.append("a reader beside the stalled ones did not get the cached answer whole")
        if growth > GROWTH_BOUND_MIB:
            worked += 1
            notes.append(f"{STALLED} stalled readers of a {size / 1e6:.0f} MB hit grew the proxy {growth:.0f} MiB")

        # 2. stalled listeners of one generation, joining late (a backlog of 5 MB) while another client reads it
        question = "one generation, many listeners"
        before = rss_mib(proxy.pid)
        first: dict[str, httpx.Response] = {}
        reader = threading.Thread(
            target=lambda: first.setdefault(
                "answer",
                httpx.post(f"{proxy.url}/v1/chat/completions", json=chat(question, stream=True), timeout=READ_BOUND),
            )
        )
        generations = held.generations
        reader.start()
        deadline = time.monotonic() + READ_BOUND
        while held.generations == generations and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)
        listeners = [stall(proxy.port, chat(question, stream=True)) for _ in range(STALLED)]
        stalled.extend(listeners)
        for sock in listeners:
            sock.recv(12)
        live = peak_growth(proxy.pid, before)
        held.release.set()
        reader.join(READ_BOUND)
        answer = first.get("answer")
        if answer is None or answer.content != sse(held.chunks, None):
            worked += 1
            notes.append("the client reading the shared generation did not get it whole")
        if live > GROWTH_BOUND_MIB:
            worked += 1
            notes.append(f"{STALLED} stalled listeners of one generation grew the proxy {live:.0f} MiB")
        notes.append(f"RSS growth: {growth:.0f} MiB (hits), {live:.0f} MiB (listeners); bound {GROWTH_BOUND_MIB:.0f}")
    finally:
        for sock in stalled:
            sock.close()
        proxy.stop()
    fault_ledger.record(
        AREA,
        f"clients that stop reading large answers: {STALLED} of a {size / 1e6:.0f} MB hit, {STALLED} of one generation",
        injected=2 * STALLED,
        attacks_worked=worked,
        notes=notes,
    )
