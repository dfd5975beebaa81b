"""Load through the proxy: many clients at once mixing cache hits, misses, identical questions in flight together and
streams, against the mock vLLM server with realistic token delays, both as processes on loopback.

The client is aiohttp (httpx's pool costs this test more CPU than the proxy does, measured: the proxy then never saw
100 clients at once). Every client checks that each answer is the complete one for its own question (the mock is
deterministic: tests/faults/answers.py), so a lost, cut, mixed-up or stale answer is counted, as is any error at
all. The proxy's memory (VmRSS) and open file descriptors are sampled under load after a warm-up and again at the
end: they must stay flat. The full run (100 clients for 60 s) is soak; the default run is the same load for a few
seconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.answers import Tally, Verdict, chat_body, judge
from tests.faults.ledger import FaultLedger
from tests.faults.proxy_runner import mock_process, open_fds, proxy_process, rss_mib, running

CHUNKS = 16
# vLLM-like pacing: 20-50 ms to the first token, 2-5 ms per token after that
MOCK_SWITCHES = ("--first-token-delay", "0.03", "--chunk-delay", "0.003", "--chunk-count", str(CHUNKS))
UPSTREAM_TIMEOUT = 10.0
DEADLINE = UPSTREAM_TIMEOUT + 20.0  # a request unanswered this long is a hang
WARM_QUESTIONS = 20
GROUP_SECONDS = 0.2  # clients choosing a shared question within the same 0.2 s ask the same one: coalesced
# Flat means: the samples at the end of the load and once the clients are done are at most this far above the
# one taken after the warm-up. Memory: the proxy's steady state holds no answers (its index is ~200 bytes per
# entry, so the few thousand new entries of a minute are ~1 MiB): 25 MiB is allocator noise with room to spare,
# while keeping one answer (~3 KB) per request would pass it within a soak's requests. Descriptors: TCP
# connections come and go with the clients and the pools, so they are bounded, not compared: one per client, at
# most one upstream stream per client, and the idle connections of the proxy's two upstream pools (at most 64
# each; the side client's are left half closed once vLLM's keep-alive ends them, until its next use); every
# other descriptor (files, listeners, pipes, sockets in any other state) must come back within 10 of the
# warm-up figure once the load is over.
RSS_GROWTH_MIB = 25.0
OTHER_FD_GROWTH = 10


def max_connections(clients: int) -> int:
    return 2 * clients + 2 * 64 + 10


@dataclass
class Sample:
    rss_mib: float
    connections: int
    other_fds: int

    def __str__(self) -> str:
        return (
            f"RSS {self.rss_mib:.1f} MiB, {self.connections + self.other_fds} fds "
            f"({self.connections} connections, {self.other_fds} other)"
        )


def sample(pid: int) -> Sample:
    return Sample(rss_mib(pid), *open_fds(pid))


async def ask(http: aiohttp.ClientSession, body: dict[str, Any]) -> Verdict:
    async def exchange() -> tuple[int, str, str | None, str | None]:
        async with http.post("/v1/chat/completions", json=body) as response:
            text = await response.text()
            return response.status, text, response.headers.get("x-cache"), response.headers.get("x-cache-key")

    try:
        status, text, cache, key = await asyncio.wait_for(exchange(), DEADLINE)
    except asyncio.TimeoutError:
        return Verdict("lost", detail=f"no answer within {DEADLINE:g}s (a hang)")
    except aiohttp.ClientError as exc:
        return Verdict("lost", detail=f"{type(exc).__name__}: {exc}")
    return judge(body, status, text, cache, key, chunk_count=CHUNKS, allowed=frozenset())  # any error fails


async def client(number: int, http: aiohttp.ClientSession, stop_at: float, tally: Tally, streams: list[int]) -> None:
    """One user: a miss first (so the pools reach full size in the warm-up), then a random mix until ``stop_at``."""
    rng = random.Random(number)
    loop = asyncio.get_running_loop()
    for n in range(1_000_000):
        if loop.time() >= stop_at:
            return
        draw = rng.random()
        if n == 0 or 0.35 <= draw < 0.65:
            question = f"load miss {number}-{n}"
        elif draw < 0.35:
            question = f"load warm {rng.randrange(WARM_QUESTIONS)}"
        else:
            question = f"load group {int(loop.time() / GROUP_SECONDS)}"
        stream = rng.random() < 0.5
        streams[0] += stream
        tally.add(await ask(http, chat_body(question, stream=stream)))


async def drive(url: str, pid: int, clients: int, warmup: float, seconds: float) -> tuple[Tally, int, list[Sample]]:
    tally, streams = Tally(), [0]
    connector = aiohttp.TCPConnector(limit=clients + 10)
    async with aiohttp.ClientSession(url, connector=connector) as http:
        # the questions the hits ask, answered (and so stored) first
        for verdict in await asyncio.gather(
            *(ask(http, chat_body(f"load warm {i}", stream=False)) for i in range(WARM_QUESTIONS))
        ):
            tally.add(verdict)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stop_at = started + warmup + seconds
        samples: list[Sample] = []

        async def sampler() -> None:
            await asyncio.sleep(warmup)  # a point in the run, not a wait for something
            samples.append(sample(pid))
            await asyncio.sleep(max(0.0, stop_at - loop.time() - 0.2))
            samples.append(sample(pid))

        await asyncio.gather(sampler(), *(client(c, http, stop_at, tally, streams) for c in range(clients)))
        # every client done, connections still open. A socket whose peer has just closed it (the mock ends idle
        # keep-alive connections after 5 s) is half closed until the proxy's loop reads the end, which under load
        # can lag: so the descriptors are judged once that has had up to 15 s; a leaked one never goes away.
        settle_at = loop.time() + 15
        after = sample(pid)
        while after.other_fds - samples[0].other_fds > OTHER_FD_GROWTH and loop.time() < settle_at:
            await asyncio.sleep(0.1)
            after = sample(pid)
        samples.append(after)
        async with http.get("/health") as health:
            if health.status != 200:
                tally.fail("dirty", f"/health answered {health.status} after the load")
    return tally, streams[0], samples


def run_load(tmp_path: Path, ledger: FaultLedger, clients: int, warmup: float, seconds: float) -> None:
    began = time.monotonic()
    with (
        running(mock_process(tmp_path, "mock", *MOCK_SWITCHES)) as mock,
        running(
            proxy_process(tmp_path, mock.url, tmp_path / "cache", "proxy", upstream_timeout=UPSTREAM_TIMEOUT)
        ) as proxy,
    ):
        idle = sample(proxy.pid)
        tally, streams, samples = asyncio.run(drive(proxy.url, proxy.pid, clients, warmup, seconds))
        alive = proxy.alive()
    before, end, after = samples
    rate = tally.requests / (warmup + seconds)
    print(
        f"\n[load] {clients} clients, {warmup:g} s warm-up + {seconds:g} s: {tally.summary()}; {streams} streamed, "
        f"{rate:.0f} requests/s; wall {time.monotonic() - began:.1f} s"
    )
    print(f"[load] proxy idle: {idle}; after warm-up: {before}; end of load: {end}; clients done: {after}")
    if not alive:
        tally.fail("lost", "the proxy process died under load")
    for log in tmp_path.glob("*.log"):  # the proxy's and the mock's output
        if "Traceback" in log.read_text(errors="replace"):
            tally.fail("dirty", f"traceback in {log.name}")
    ledger.record(
        "load",
        f"{clients} clients mixing hits, misses, coalesced and streams",
        injected=tally.requests,
        notes=tally.notes,
        **tally.failures(),
    )
    assert {"HIT", "MISS", "COALESCED"} <= set(tally.cache) and streams, f"the mix did not happen: {tally.summary()}"
    assert end.rss_mib - before.rss_mib <= RSS_GROWTH_MIB and after.rss_mib - before.rss_mib <= RSS_GROWTH_MIB, (
        f"proxy memory grew under load: {before} -> {end} -> {after}"
    )
    assert after.other_fds - before.other_fds <= OTHER_FD_GROWTH, (
        f"proxy file descriptors other than connections grew under load: {before} -> {end} -> {after}"
    )
    assert max(s.connections for s in samples) <= max_connections(clients), f"connections beyond the bound: {samples}"


def test_load_short(tmp_path: Path, fault_ledger: FaultLedger) -> None:
    run_load(tmp_path, fault_ledger, clients=100, warmup=1.0, seconds=3.0)


@pytest.mark.soak
def test_load_soak(tmp_path: Path, fault_ledger: FaultLedger) -> None:
    run_load(tmp_path, fault_ledger, clients=100, warmup=5.0, seconds=60.0)
