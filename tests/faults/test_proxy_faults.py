"""The proxy under faults: a hostile upstream, clients that leave, a broken cache disk, a SIGKILL mid-write.

For every fault kind many requests (streamed and plain, some identical and in flight together) are judged from
the client's side (tests/faults/answers.py): each gets its own complete answer or a clean OpenAI-shaped error
within the configured timeout plus a margin; afterwards the proxy still answers /health and every entry in the
cache directory is whole and served whole as a HIT. Counts go to the fault ledger ("proxy faults").
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import llmpod._files
import llmpod.proxy._cache_files
import llmpod.proxy.cache
from tests.faults.answers import (
    HONEST_5XX,
    Tally,
    ask,
    ask_all,
    cache_files,
    chat_body,
    check_cache_dir,
)
from tests.faults.ledger import FaultLedger
from tests.faults.proxy_runner import proxy_process
from tests.support.helpers import MockControl, ProxyFactory
from tests.support.servers import LoopbackServer, free_port

AREA = "proxy faults"
CHUNKS = 8  # tokens per mock answer
KILL_CHUNKS = 300  # long answers (~70 KB entries): each write takes a while
TIMEOUT = 1.0  # the proxy's UPSTREAM_TIMEOUT in these tests
MARGIN = 15.0  # a request still unanswered this long after the timeout is a hang (the machine is shared)


def deadline(timeout: float = TIMEOUT) -> float:
    return timeout + MARGIN


def workload(label: str, prompts: int, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """``prompts`` distinct questions, each asked ``repeats`` times, streamed and plain, shuffled: identical
    requests end up in flight together (coalesced) and after one another (hits)."""
    bodies = [
        chat_body(f"{label} question {p}", stream=(p + r) % 2 == 0) for p in range(prompts) for r in range(repeats)
    ]
    random.Random(seed).shuffle(bodies)
    return bodies


async def settled(cache_dir: Path, keys: Iterable[str]) -> None:
    """Wait until the write-behind is done: every answer in ``keys`` is on disk, and no temp file is left."""
    wanted = {f"{key}.json" for key in keys}
    deadline_at = time.monotonic() + 30
    while time.monotonic() < deadline_at:
        names = {p.name for p in cache_dir.iterdir()} if cache_dir.is_dir() else set()
        if wanted <= names and not any(n.startswith(llmpod.proxy.cache.TMP_PREFIX) for n in names):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"30 s after answering, {len(wanted - names)} of {len(wanted)} answers are not stored "
        f"or temp files are left: {sorted(names)[:4]}"
    )


async def still_up(http: httpx.AsyncClient, tally: Tally) -> None:
    """The proxy keeps answering /health (200, JSON) after the fault."""
    try:
        response = await http.get("/health", timeout=10)
        ok = response.status_code == 200 and response.json()["status"] in ("healthy", "degraded")
    except (httpx.HTTPError, ValueError, KeyError):
        ok = False
    if not ok:
        tally.fail("dirty", "the proxy stopped answering /health")


class Tracebacks(logging.Filter):
    """Collects logged errors that carry a traceback: the proxy's own loggers (through a handler on the root) and
    uvicorn's "Exception in ASGI application" (on its logger, which does not propagate to the root and whose
    handlers uvicorn replaces when a server is configured: filters stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.handler = logging.Handler(logging.ERROR)
        self.handler.emit = self.note  # type: ignore[method-assign]

    def note(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.levelno >= logging.ERROR:
            self.seen.append(f"{record.name}: {record.getMessage()[:100]}")

    def filter(self, record: logging.LogRecord) -> bool:
        self.note(record)
        return True


@pytest.fixture(autouse=True)
def tracebacks() -> Iterator[Tracebacks]:
    catcher = Tracebacks()
    logging.getLogger().addHandler(catcher.handler)
    logging.getLogger("uvicorn.error").addFilter(catcher)
    yield catcher
    logging.getLogger("uvicorn.error").removeFilter(catcher)
    logging.getLogger().removeHandler(catcher.handler)


def record(ledger: FaultLedger, kind: str, injected: int, tally: Tally, tracebacks: Tracebacks, log_dir: Path) -> None:
    """Into the ledger; a traceback logged in this process or in a log file of a proxy process is a dirty error."""
    for seen in tracebacks.seen:
        tally.fail("dirty", f"traceback logged: {seen}")
    for log in log_dir.glob("*.log"):
        if "Traceback" in log.read_text(errors="replace"):
            tally.fail("dirty", f"traceback in {log.name}")
    print(f"\n[{AREA}] {kind}: {injected} injected; {tally.summary()}")
    ledger.record(AREA, kind, injected=injected, notes=tally.notes, **tally.failures())


# --------------------------------------------------------------------------------------------- hostile upstream
@dataclass(frozen=True)
class UpstreamFault:
    kind: str
    mock: dict[str, Any]
    timeout: float = TIMEOUT
    allowed: frozenset[int] = HONEST_5XX
    refused: bool = False  # nothing listens where the proxy's upstream should be
    answers_expected: bool = True  # some requests should get through (the fault strikes a fraction)
    proxy: dict[str, Any] = field(default_factory=dict)


UPSTREAM_FAULTS = [
    UpstreamFault("upstream refuses connections", {}, refused=True, answers_expected=False),
    UpstreamFault(
        "upstream silent past UPSTREAM_TIMEOUT before the first token",
        {"first_token_delay": 1.0},
        timeout=0.3,
        answers_expected=False,
    ),
    UpstreamFault("upstream slow but within UPSTREAM_TIMEOUT", {"first_token_delay": 0.2, "chunk_delay": 0.03}),
    UpstreamFault(
        "upstream answers 429 and 500 at random",
        {"error_rate": 0.25, "rate_limit_rate": 0.25},
        allowed=HONEST_5XX | {429, 500},
    ),
    UpstreamFault("upstream closes the connection mid-stream", {"die_after_chunks": 3}, answers_expected=False),
    UpstreamFault("upstream sends malformed SSE", {"stream_fault": "malformed_sse", "stream_fault_rate": 0.5}),
    UpstreamFault("upstream sends an invalid JSON event", {"stream_fault": "invalid_json", "stream_fault_rate": 0.5}),
    UpstreamFault("upstream ends a stream without [DONE]", {"stream_fault": "no_done", "stream_fault_rate": 0.5}),
    UpstreamFault(
        "upstream stalls mid-stream past UPSTREAM_TIMEOUT",
        {"stream_fault": "stall", "stream_fault_rate": 0.5, "stream_fault_after": 4},
        timeout=0.4,
    ),
]


async def run_upstream_fault(
    fault: UpstreamFault,
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    prompts: int,
    repeats: int,
) -> tuple[int, Tally]:
    mock_control.configure(chunk_count=CHUNKS, **fault.mock)
    cache_dir = tmp_path / "cache"
    overrides: dict[str, Any] = {"upstream_timeout": fault.timeout, "cache_dir": cache_dir, **fault.proxy}
    if fault.refused:
        overrides["upstream_url"] = f"http://127.0.0.1:{free_port()}/v1"
    proxy = start_proxy(**overrides)
    tally = Tally()
    bodies = workload(fault.kind, prompts, repeats)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=deadline(fault.timeout) + 5) as http:
        await ask_all(http, bodies, tally, chunk_count=CHUNKS, deadline=deadline(fault.timeout), allowed=fault.allowed)
        await still_up(http, tally)
        await settled(cache_dir, tally.answered_keys)
        stored = await check_cache_dir(http, cache_dir, tally, chunk_count=CHUNKS, deadline=deadline(fault.timeout))
    # what the upstream did to the proxy: refused connections, slow generations, or the switch's own count
    if fault.refused:
        injected = len(bodies)
    elif "first_token_delay" in fault.mock:
        injected = mock_control.generations()
    else:
        injected = sum(mock_control.stats()["injected"].values())
    print(f"  {stored} entries on disk after the fault; upstream errors seen: {tally.errors}")
    if fault.answers_expected:
        assert tally.answers > 0, f"{fault.kind}: no request got through ({tally.summary()})"
    else:
        assert tally.answers == 0 and stored == 0, f"{fault.kind}: {tally.summary()}, {stored} stored"
    return injected, tally


# the default run: one representative of each fault (a slow upstream that stays within the timeout is soak only)
QUICK_FAULTS = [f for f in UPSTREAM_FAULTS if "within" not in f.kind]


@pytest.mark.parametrize("fault", QUICK_FAULTS, ids=[f.kind for f in QUICK_FAULTS])
async def test_hostile_upstream(
    fault: UpstreamFault,
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    injected, tally = await run_upstream_fault(fault, start_proxy, mock_control, tmp_path, prompts=4, repeats=3)
    record(fault_ledger, fault.kind, injected, tally, tracebacks, tmp_path)


@pytest.mark.soak
@pytest.mark.parametrize("fault", UPSTREAM_FAULTS, ids=[f.kind for f in UPSTREAM_FAULTS])
async def test_hostile_upstream_soak(
    fault: UpstreamFault,
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    injected, tally = await run_upstream_fault(fault, start_proxy, mock_control, tmp_path, prompts=30, repeats=4)
    record(fault_ledger, fault.kind, injected, tally, tracebacks, tmp_path)


# --------------------------------------------------------------------------------------------- clients leave
async def run_disconnects(
    proxy: LoopbackServer, cache_dir: Path, mock_control: MockControl, prompts: int
) -> tuple[int, Tally]:
    """Per question: a stream that leaves after two chunks, a plain request that gives up, and (for two questions
    in three) a client that stays for the whole answer; then every question again, which must be answered whole."""
    chunks = 3 * CHUNKS
    mock_control.configure(chunk_count=chunks, chunk_delay=0.02)
    tally = Tally()
    left = 0

    async def stream_and_leave(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal left
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            received = 0
            async for _ in response.aiter_raw():
                received += 1
                if received == 2:
                    left += 1
                    return  # leaving the block closes the connection mid-stream

    async def give_up(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal left
        verdict = await ask(http, body, chunk_count=chunks, deadline=0.15)
        if verdict.outcome == "lost":  # our own timeout: the client left
            left += 1
        else:
            tally.add(verdict)

    async with httpx.AsyncClient(base_url=proxy.url, timeout=deadline() + 5) as http:
        work = []
        for p in range(prompts):
            plain, streamed = (chat_body(f"leaving question {p}", stream=s) for s in (False, True))
            work += [stream_and_leave(http, streamed), give_up(http, plain)]
            if p % 3:
                stayer = streamed if p % 2 else plain
                work.append(ask_all(http, [stayer], tally, chunk_count=chunks, deadline=deadline()))
        await asyncio.gather(*work)
        await wait_for_idle(http)
        await still_up(http, tally)
        await settled(cache_dir, tally.answered_keys)
        await check_cache_dir(http, cache_dir, tally, chunk_count=chunks, deadline=deadline())
        again = [chat_body(f"leaving question {p}", stream=s) for p in range(prompts) for s in (False, True)]
        await ask_all(http, again, tally, chunk_count=chunks, deadline=deadline())
    return left, tally


async def wait_for_idle(http: httpx.AsyncClient) -> None:
    """Every request and upstream call has ended (cancelled, or finished for the clients that stayed)."""
    deadline_at = time.monotonic() + 30
    while time.monotonic() < deadline_at:
        metrics = (await http.get("/metrics")).json()
        if metrics["in_flight"] == 0 and metrics["upstream_in_flight"] == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("requests still in flight 30 s after every client left or finished")


async def test_clients_leaving_mid_answer(
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    left, tally = await run_disconnects(start_proxy(), tmp_path / "cache", mock_control, prompts=6)
    record(fault_ledger, "client disconnects mid-answer", left, tally, tracebacks, tmp_path)


@pytest.mark.soak
async def test_clients_leaving_mid_answer_soak(
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    left, tally = await run_disconnects(start_proxy(), tmp_path / "cache", mock_control, prompts=40)
    record(fault_ledger, "client disconnects mid-answer", left, tally, tracebacks, tmp_path)


# --------------------------------------------------------------------------------------------- a broken cache disk
class BrokenDisk:
    """Stands in for ``os`` inside ``llmpod.proxy.cache``, ``llmpod.proxy._cache_files`` and ``llmpod._files``:
    while ``broken``, opening a file in the cache directory for writing fails with EROFS (a read-only mount: reading
    still works), or writing to one fails with ENOSPC (a full disk), as the kernel would."""

    def __init__(self, cache_dir: Path, error: int) -> None:
        self.prefix = str(cache_dir) + os.sep
        self.error = error
        self.broken = False
        self.refused = 0  # operations the broken disk refused
        self._fds: set[int] = set()

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if self.broken and self.error == errno.EROFS and writing and str(path).startswith(self.prefix):
            self.refused += 1
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        fd = os.open(path, flags, mode)
        if str(path).startswith(self.prefix):
            self._fds.add(fd)
        return fd

    def write(self, fd: int, data: Any) -> int:
        if self.broken and self.error == errno.ENOSPC and fd in self._fds:
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def close(self, fd: int) -> None:
        self._fds.discard(fd)
        os.close(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


class Clock:
    """Stands in for ``time`` inside ``llmpod.proxy.cache``, so "retried a minute later" needs no minute."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


DISK_FAULTS = [
    "cache disk full (ENOSPC)",
    "cache directory read-only (EROFS)",
    "cache directory cannot be created",
    "cache directory deleted while running",
]


async def run_disk_fault(
    kind: str,
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rounds: int,
) -> tuple[int, Tally, list[str]]:
    """Answers before, during and after the fault; returns the faults injected, the tally, and what went wrong
    with storing (it must stop during the fault and resume once the disk is usable and the pause is over)."""
    cache_dir = tmp_path / "cache"
    if kind == "cache directory cannot be created":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the cache directory's parent should be")
        cache_dir = blocker / "cache"
    disk = BrokenDisk(cache_dir, errno.ENOSPC if "ENOSPC" in kind else errno.EROFS)
    clock = Clock()
    mock_control.configure(chunk_count=CHUNKS)
    monkeypatch.setattr(llmpod.proxy.cache, "os", disk)
    monkeypatch.setattr(llmpod.proxy._cache_files, "os", disk)
    monkeypatch.setattr(llmpod._files, "os", disk)  # where the entries are written (atomic_write)
    monkeypatch.setattr(llmpod.proxy.cache, "time", clock)
    proxy = start_proxy(cache_dir=cache_dir)
    tally, problems, injected = Tally(), [], 0

    async def metrics(http: httpx.AsyncClient) -> dict[str, Any]:
        return (await http.get("/metrics")).json()  # type: ignore[no-any-return]

    async with httpx.AsyncClient(base_url=proxy.url, timeout=deadline() + 5) as http:
        for number in range(rounds):
            before = [chat_body(f"disk {number} before {i}", stream=i % 2 == 0) for i in range(3)]
            during = [chat_body(f"disk {number} during {i}", stream=i % 2 == 0) for i in range(6)]
            after = [chat_body(f"disk {number} after {i}", stream=i % 2 == 0) for i in range(3)]
            if kind != "cache directory cannot be created" or number > 0:
                await ask_all(http, before, tally, chunk_count=CHUNKS, deadline=deadline())
                await settled(cache_dir, map(key_of, before))
            # the fault
            if kind == "cache directory deleted while running":
                for path in cache_files(cache_dir):
                    path.unlink()
                cache_dir.rmdir()
            elif kind != "cache directory cannot be created":
                disk.broken = True
            elif number > 0:  # the directory goes, and a file takes its parent's place again
                shutil.rmtree(blocker)
                blocker.write_text("again")
            injected += 1
            await ask_all(http, during[:1], tally, chunk_count=CHUNKS, deadline=deadline())
            if kind == "cache directory deleted while running":
                await ask_all(http, [*during[1:], *before], tally, chunk_count=CHUNKS, deadline=deadline())
            else:  # the first answer's write fails and storing stops: the next answers are not even tried
                if not await storing_becomes(http, False):
                    problems.append(f"round {number}: cache_storing stayed true after a failed write")
                refused = disk.refused
                await ask_all(http, [*during[1:], *before, *during], tally, chunk_count=CHUNKS, deadline=deadline())
                if disk.refused != refused or (await metrics(http))["cache_storing"]:
                    problems.append(
                        f"round {number}: storing went on during the fault (refused writes {refused} -> {disk.refused})"
                    )
            # the disk is usable again; "a minute later"
            disk.broken = False
            if kind == "cache directory cannot be created":
                blocker.unlink()
            clock.offset += llmpod.proxy.cache.RETRY_STORE_AFTER + 1
            await ask_all(http, after, tally, chunk_count=CHUNKS, deadline=deadline())
            try:
                await settled(cache_dir, map(key_of, after))
            except AssertionError as exc:
                problems.append(f"round {number}: {exc}")
            if not await storing_becomes(http, True):
                problems.append(f"round {number}: cache_storing stayed false once the disk was usable again")
            await still_up(http, tally)
            await check_cache_dir(http, cache_dir, tally, chunk_count=CHUNKS, deadline=deadline())
        discarded = (await metrics(http))["cache_corrupt_discarded"]
        if discarded:  # a full or read-only disk still reads: its entries are served, not thrown away
            problems.append(f"{discarded} good entries discarded as corrupt")
    return injected, tally, problems


async def storing_becomes(http: httpx.AsyncClient, value: bool) -> bool:
    """Whether /metrics shows ``cache_storing: value`` within 30 s (a write's outcome reaches the index just after
    the write, on the proxy's loop)."""
    deadline_at = time.monotonic() + 30
    while time.monotonic() < deadline_at:
        if (await http.get("/metrics")).json()["cache_storing"] is value:
            return True
        await asyncio.sleep(0.02)
    return False


def _keyed(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


def key_of(body: dict[str, Any]) -> str:
    """The proxy's cache key for ``body`` (it names the served model, so the proxy forwards it unchanged) from
    the mock, which marks itself as such."""
    return llmpod.proxy.cache.cache_key("chat.completions", _keyed(body), "mock")


@pytest.mark.parametrize("kind", [k for k in DISK_FAULTS if "cannot be created" not in k])  # that one: soak
async def test_broken_cache_disk(
    kind: str,
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    injected, tally, problems = await run_disk_fault(kind, start_proxy, mock_control, tmp_path, monkeypatch, rounds=1)
    record(fault_ledger, kind, injected, tally, tracebacks, tmp_path)
    assert not problems, problems


@pytest.mark.soak
@pytest.mark.parametrize("kind", DISK_FAULTS)
async def test_broken_cache_disk_soak(
    kind: str,
    start_proxy: ProxyFactory,
    mock_control: MockControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    injected, tally, problems = await run_disk_fault(kind, start_proxy, mock_control, tmp_path, monkeypatch, rounds=3)
    record(fault_ledger, kind, injected, tally, tracebacks, tmp_path)
    assert not problems, problems


# --------------------------------------------------------------------------------------------- SIGKILL mid-write
def plant_corrupt_files(cache_dir: Path, answered: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What a crash on a filesystem without atomic rename, or a bad disk, could leave: a torn entry under its own
    name, an entry missing its answer, an entry under another key's name, and a half-written temp file.
    Only entries of ``answered`` (asked again after the restart) are spoiled. Returns the keys whose files are
    now corrupt (each must be discarded and answered afresh)."""
    files = [path for key, _ in answered if (path := cache_dir / f"{key}.json").exists()]
    corrupt: list[str] = []
    if len(files) >= 3:
        torn, gutted, wrong = files[:3]
        torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
        document = orjson.loads(gutted.read_bytes())
        gutted.write_bytes(orjson.dumps({k: v for k, v in document.items() if k not in ("response", "chunks")}))
        document = orjson.loads(wrong.read_bytes())
        wrong.write_bytes(orjson.dumps({**document, "key": "0" * 64}))
        corrupt += [p.name[:-5] for p in (torn, gutted, wrong)]
    if answered:  # a temp file left by a write the kill interrupted (the proxy must never serve or keep it)
        key = answered[0][0]
        leftover = cache_dir / f"{llmpod.proxy.cache.TMP_PREFIX}{key}-99999-1"
        leftover.write_bytes(b'{"format": 1, "key": "' + key.encode())
    return corrupt


SIGKILL_KIND = "SIGKILL proxy while writing cache entries, then restart"


def kill_mid_write(pid: int, cache_dir: Path, armed: threading.Event, killed: threading.Event) -> None:
    """Once armed, SIGKILL the proxy the moment one of its cache writes is in progress (a temp file exists), or
    after 10 s of looking if none is ever seen (bounded: the test must stop by itself)."""
    armed.wait(timeout=60)
    give_up_at = time.monotonic() + 10
    while time.monotonic() < give_up_at:
        with os.scandir(cache_dir) as entries:
            if any(entry.name.startswith(llmpod.proxy.cache.TMP_PREFIX) for entry in entries):
                break
    killed.set()
    os.kill(pid, signal.SIGKILL)


async def kill_round(
    number: int, tmp_path: Path, upstream: str, cache_dir: Path, tally: Tally, answers_before_kill: int
) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    """Drive unique questions at a proxy process and SIGKILL it while it writes an answer to the cache."""
    proxy = proxy_process(tmp_path, upstream, cache_dir, f"proxy-kill-{number}", upstream_timeout=TIMEOUT)
    proxy.start()
    asked: list[dict[str, Any]] = []
    answered: list[tuple[str, dict[str, Any]]] = []
    armed, killed = threading.Event(), threading.Event()
    killer = threading.Thread(target=kill_mid_write, args=(proxy.pid, cache_dir, armed, killed), daemon=True)
    killer.start()
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=deadline() + 5) as http:

            async def worker(w: int) -> None:
                for i in range(10_000):
                    if killed.is_set():
                        return
                    body = chat_body(
                        f"kill {number} worker {w} question {i}", stream=(w + i) % 2 == 0, max_tokens=KILL_CHUNKS + 100
                    )
                    asked.append(body)
                    verdict = await ask(http, body, chunk_count=KILL_CHUNKS, deadline=deadline())
                    if killed.is_set():
                        return  # the proxy died under this request: that is the fault, not a lost answer
                    tally.add(verdict)
                    if verdict.key != key_of(body):
                        tally.fail("corrupt", f"answered under key {verdict.key}, not {key_of(body)}")
                    answered.append((key_of(body), body))
                    if len(answered) >= answers_before_kill:
                        armed.set()

            await asyncio.gather(*(worker(w) for w in range(8)))
    finally:
        armed.set()
        killer.join(timeout=30)
        proxy.stop()  # reaps the killed process
    return asked, answered


async def run_kills(tmp_path: Path, upstream: str, rounds: int) -> tuple[int, Tally, list[str]]:
    cache_dir = tmp_path / "cache"
    tally, problems, injected = Tally(), [], 0
    for number in range(rounds):
        asked, answered = await kill_round(number, tmp_path, upstream, cache_dir, tally, answers_before_kill=24)
        injected += 1
        torn = [p for p in cache_dir.iterdir() if p.name.startswith(llmpod.proxy.cache.TMP_PREFIX)]
        unwritten = [key for key, _ in answered if not (cache_dir / f"{key}.json").exists()]
        corrupt = plant_corrupt_files(cache_dir, answered)
        injected += len(corrupt) + 1
        proxy = proxy_process(tmp_path, upstream, cache_dir, f"proxy-restarted-{number}", upstream_timeout=TIMEOUT)
        proxy.start()
        try:
            left = [p.name for p in cache_dir.iterdir() if p.name.startswith(llmpod.proxy.cache.TMP_PREFIX)]
            if left:
                problems.append(f"round {number}: temp files kept after the restart: {left[:3]}")
            async with httpx.AsyncClient(base_url=proxy.url, timeout=deadline() + 5) as http:
                again = [
                    {**b, **({"stream": True, "stream_options": {"include_usage": True}} if i % 2 else {})}
                    for i, b in enumerate(_keyed(b) for b in asked)
                ]
                verdicts = await ask_all(http, again, tally, chunk_count=KILL_CHUNKS, deadline=deadline())
                served = {v.key: v.cache for v in verdicts}
                for key in corrupt:
                    if served.get(key) == "HIT":
                        tally.fail("corrupt", f"round {number}: a corrupt file {key[:12]} was served as a HIT")
                await settled(cache_dir, tally.answered_keys)
                discarded = (await http.get("/metrics")).json()["cache_corrupt_discarded"]
                if discarded < len(corrupt):
                    problems.append(f"round {number}: cache_corrupt_discarded {discarded} < {len(corrupt)} planted")
                await still_up(http, tally)
                # every question was just asked again (a HIT must be whole): here, what is on disk
                await check_cache_dir(http, cache_dir, tally, chunk_count=KILL_CHUNKS, deadline=deadline(), reask=False)
                print(
                    f"  round {number}: {len(answered)} answered before SIGKILL, {len(asked)} asked, "
                    f"{len(torn)} writes cut and {len(unwritten)} answers left unwritten by the kill; after the "
                    f"restart {len(cache_files(cache_dir))} entries, {discarded} corrupt discarded"
                )
        finally:
            proxy.stop()
    return injected, tally, problems


async def test_sigkill_while_writing_cache_entries(
    mock_vllm: LoopbackServer,
    mock_control: MockControl,
    tmp_path: Path,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    mock_control.configure(chunk_count=KILL_CHUNKS)
    injected, tally, problems = await run_kills(tmp_path, mock_vllm.url, rounds=1)
    record(fault_ledger, SIGKILL_KIND, injected, tally, tracebacks, tmp_path)
    assert not problems, problems


@pytest.mark.soak
async def test_sigkill_while_writing_cache_entries_soak(
    mock_vllm: LoopbackServer,
    mock_control: MockControl,
    tmp_path: Path,
    fault_ledger: FaultLedger,
    tracebacks: Tracebacks,
) -> None:
    mock_control.configure(chunk_count=KILL_CHUNKS)
    injected, tally, problems = await run_kills(tmp_path, mock_vllm.url, rounds=4)
    record(fault_ledger, SIGKILL_KIND, injected, tally, tracebacks, tmp_path)
    assert not problems, problems
