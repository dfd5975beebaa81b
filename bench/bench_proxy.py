#!/usr/bin/env python3
"""Benchmark the caching proxy against a ceiling and the mock vLLM server, side by side in one run.

    python3 bench/bench_proxy.py [--rounds 3] [--duration 3] [--quick] [--only hits,passthrough]
                                 [--entries 100000] [--json PATH]

Starts its own servers on 127.0.0.1 and free ports (the proxy as users run it, the mock vLLM server, a
"ceiling" FastAPI app on the same server stack that answers fixed bytes, and a "floor": the thinnest
forwarder on that stack, what a miss could cost at best), measures, prints one table of
absolute figures, ratios and targets (PASS/FAIL), and writes the same as JSON (default
bench/results/bench-<UTC timestamp>.json). Comparisons are interleaved: every round runs each scenario
being compared once, in rotating order, and the table shows the medians of the rounds (ratios and
differences are taken within a round, then the median). Load comes from wrk (-t1, whole seconds), or from
an asyncio fallback when wrk is unavailable (the header says so; its figures are not comparable).

Sections (--only): ceiling, direct, hits, passthrough (wrk, 1 and 16 clients); streaming (time to first
token and inter-chunk gap with realistic token timing, proxy minus direct); coalescing (100 identical
concurrent requests, slow upstream); memory (RSS idle, with 1k/10k/100k entries on disk, start-up time);
scaling (hit latency with 1k vs 100k entries, miss latency when the cache is full and evicting); kilo_turn (the
time to first token a recorded-size Kilo Code turn gets through the proxy to a vLLM pod 80 ms away, vLLM 0.33 and
0.27 alike, and with --before DIR the same through another checkout's proxy: bench/kilo_bench.py).

Exit code 0 whatever the targets say (it is a report); 1 if a section broke (its error is printed); 2 for bad
flags; 130 when interrupted. Every server it starts is stopped and its temp directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402

from bench import cachefill, clients, kilo_bench, loadgen, report  # noqa: E402
from bench.loadgen import LoadResult, Workload  # noqa: E402
from bench.report import Row, Target, median  # noqa: E402
from bench.servers import ServerProcess, ceiling_server, floor_server, mock_server, proxy_server  # noqa: E402

SECTIONS = ("ceiling", "direct", "hits", "passthrough", "streaming", "coalescing", "memory", "scaling", "kilo_turn")
HTTP_SECTIONS = ("ceiling", "direct", "hits", "passthrough")
CONNECTIONS = (1, 16)
CHAT = "/v1/chat/completions"
STREAM_SWITCHES = ("--chunk-delay", "0.005", "--chunk-count", "40", "--first-token-delay", "0.02")
SLOW_SWITCHES = ("--first-token-delay", "1.0")
SCALING_BODIES = 1000  # distinct entries a scaling run cycles through
MEMORY_HITS = 1000
MARK = "@@N@@"


class BenchError(Exception):
    """A check the figures depend on failed (the section's numbers would mean nothing)."""


def chat_body(content: str, max_tokens: int = 50, **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    )


def unique_workload(
    label: str, headers: dict[str, str] | None = None, nonce: str | None = None, extra: dict[str, Any] | None = None
) -> Workload:
    """Bodies never sent before: ``label nonce #1``, ``#2``, ... (a fresh nonce per call unless given)."""
    full = chat_body(f"{label} {nonce or uuid.uuid4().hex[:12]} #{MARK}", **(extra or {}))
    head, tail = full.split(MARK.encode())
    return Workload.unique(head, tail, headers)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- header
def machine_info(wrk: str | None) -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
                    break
    except OSError:
        pass

    def version(name: str) -> str | None:
        if importlib.util.find_spec(name) is None:
            return None
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "present"

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_total_gib": round(mem_kib / 1024**2, 1) if mem_kib else None,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "wrk": loadgen.wrk_version(wrk) if wrk else None,
        "uvloop": version("uvloop"),
        "httptools": version("httptools"),
        "platform": platform.platform(),
    }


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
        return result.stdout.strip() if result.returncode == 0 else ""

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        changes = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "unknown", "dirty": None, "changes": []}
    return {"commit": commit + ("+dirty" if changes else ""), "dirty": bool(changes), "changes": changes}


# ------------------------------------------------------------------------------------------------- the run
class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, wrk: str | None) -> None:
        self.args = args
        self.tmp = tmp
        self.wrk = wrk
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.servers: list[ServerProcess] = []
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.sections: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.notes: list[str] = []
        self._mock: ServerProcess | None = None
        self._data: dict[int, cachefill.FilledDir] = {}
        self.ports: list[int] = []

    # ---------------------------------------------------------------- servers
    def start(self, server: ServerProcess) -> ServerProcess:
        self.servers.append(server)
        server.start()
        self.ports.append(server.port)
        return server

    def stop(self, server: ServerProcess) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                progress(f"could not stop {server.name}: {exc}")
        self.servers.clear()

    def mock(self) -> ServerProcess:
        """The plain mock (default switches), shared by the sections that need a fast upstream."""
        if self._mock is None or not self._mock.alive():
            self._mock = self.start(mock_server("mock", self.logs))
        return self._mock

    def proxy(self, name: str, upstream: ServerProcess, cache_dir: Path, **limits: int) -> ServerProcess:
        return self.start(proxy_server(name, self.logs, upstream, cache_dir, **limits))

    # ---------------------------------------------------------------- helpers
    def load(self, url: str, workload: Workload, connections: int, duration: float | None = None) -> LoadResult:
        duration = self.args.duration if duration is None else duration
        if self.wrk:
            return loadgen.run_wrk(self.wrk, url, workload, connections, duration, self.tmp)
        return loadgen.run_python(url, workload, connections, duration)

    @staticmethod
    def metrics(server: ServerProcess) -> dict[str, Any]:
        return httpx.get(f"{server.url}/metrics", timeout=10).json()  # type: ignore[no-any-return]

    @staticmethod
    def index_loaded(proxy: ServerProcess, timeout: float = 60.0) -> float:
        """Seconds from the proxy's Popen until its cache index has loaded (it serves before: /health 200)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=10) as http:
            while http.get(f"{proxy.url}/health").json()["cache_loading"]:
                if time.monotonic() > deadline:
                    raise BenchError(f"{proxy.name}: the cache index did not load within {timeout:.0f} s")
                time.sleep(0.005)
        return time.perf_counter() - proxy.started_at

    @staticmethod
    def generations(mock: ServerProcess) -> int:
        requests = httpx.get(f"{mock.url}/mock/stats", timeout=10).json()["requests"]
        return int(requests.get("chat.completions", 0)) + int(requests.get("completions", 0))

    @staticmethod
    def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(
            url, content=body, headers={"Content-Type": "application/json", **(headers or {})}, timeout=30
        )

    def row(
        self,
        section: str,
        metric: str,
        c1: str = "",
        c16: str = "",
        ratio: str = "",
        target: Target | None = None,
        target_text: str = "",
    ) -> None:
        self.rows.append(
            Row(
                section,
                metric,
                c1,
                c16,
                ratio,
                target.target if target else target_text,
                target.result if target else "",
            )
        )

    def target(
        self,
        section: str,
        name: str,
        target: str,
        value: float | None,
        display: str,
        ok: Callable[[float], bool],
        problem: str = "",
    ) -> Target:
        passed = None if value is None or problem else ok(value)
        result = Target(section, name, target, value, display, passed, problem)
        self.targets.append(result)
        return result

    def dataset(self, count: int) -> cachefill.FilledDir:
        """A cache directory holding entries 0..count-1; the largest is written once, smaller ones are
        hard-linked subsets of it."""
        largest = self.args.entries
        if largest not in self._data:
            progress(f"writing {largest} cache entries (2-20 KB each) ...")
            self._data[largest] = cachefill.fill(self.tmp / f"entries-{largest}", largest, self.args.seed)
            progress(
                f"  done in {self._data[largest].seconds:.1f} s ({self._data[largest].summary()['bytes'] / 1e6:.0f} MB)"
            )
        if count not in self._data:
            self._data[count] = cachefill.link_subset(self._data[largest], self.tmp / f"entries-{count}", count)
        return self._data[count]

    def tiers(self) -> list[int]:
        n = self.args.entries
        return sorted({t for t in (1000, 10000) if t < n} | {n})

    # ================================================================ 1-4: wrk sections
    def run_http(self, names: list[str]) -> None:
        """ceiling, direct, hits, passthrough: interleaved round-robin, 1 and 16 clients."""
        scenarios: list[tuple[str, str, ServerProcess, Callable[[], Workload]]] = []
        mock = self.mock() if set(names) & {"direct", "hits", "passthrough"} else None
        proxy = None
        if set(names) & {"hits", "passthrough"}:
            assert mock is not None
            proxy = self.proxy("proxy", mock, self.tmp / "proxy-cache")
        if "ceiling" in names:
            ceiling = self.start(ceiling_server("ceiling", self.logs))
            body = chat_body("bench ceiling")
            if self.post(f"{ceiling.url}{CHAT}", body).status_code != 200:
                raise BenchError("the ceiling app did not answer 200")
            scenarios.append(("ceiling", "ceiling", ceiling, lambda: Workload.fixed(body)))
        if "direct" in names:
            assert mock is not None
            if self.post(f"{mock.url}{CHAT}", chat_body("bench direct check")).status_code != 200:
                raise BenchError("the mock did not answer 200")
            scenarios.append(("direct", "direct", mock, lambda: unique_workload("bench direct")))
            # info: the mock streaming, as the proxy always asks it to (the proxy's floor on a miss)
            scenarios.append(
                (
                    "direct",
                    "direct-stream",
                    mock,
                    lambda: unique_workload(
                        "bench direct stream", extra={"stream": True, "stream_options": {"include_usage": True}}
                    ),
                )
            )
        if "hits" in names:
            assert proxy is not None
            hit_body = chat_body(f"bench hit {uuid.uuid4().hex[:12]}")
            first = self.post(f"{proxy.url}{CHAT}", hit_body)
            second = self.post(f"{proxy.url}{CHAT}", hit_body)
            seen = (first.status_code, first.headers.get("x-cache"), second.status_code, second.headers.get("x-cache"))
            self.sections.setdefault("hits", {})["priming"] = {"first": seen[:2], "second": seen[2:]}
            if seen != (200, "MISS", 200, "HIT"):
                raise BenchError(
                    f"hits: primed request then repeat answered {seen[0]} X-Cache={seen[1]}, "
                    f"{seen[2]} X-Cache={seen[3]} (expected 200 MISS, 200 HIT)"
                )
            scenarios.append(("hits", "hits", proxy, lambda: Workload.fixed(hit_body)))
        if "passthrough" in names:
            assert proxy is not None
            bypass_body = chat_body(f"bench bypass {uuid.uuid4().hex[:12]}")
            no_cache = {"Cache-Control": "no-cache"}
            miss = self.post(f"{proxy.url}{CHAT}", chat_body(f"bench miss check {uuid.uuid4().hex}"))
            bypass = self.post(f"{proxy.url}{CHAT}", bypass_body, no_cache)
            seen = (miss.status_code, miss.headers.get("x-cache"), bypass.status_code, bypass.headers.get("x-cache"))
            if seen != (200, "MISS", 200, "BYPASS"):
                raise BenchError(
                    f"passthrough: a unique body answered {seen[0]} X-Cache={seen[1]}, the no-cache "
                    f"one {seen[2]} X-Cache={seen[3]} (expected 200 MISS, 200 BYPASS)"
                )
            # the miss floor: a bare forwarder on the same stack and upstream client (bench/floor_app.py)
            assert mock is not None
            floor = self.start(floor_server("floor", self.logs, mock))
            if self.post(f"{floor.url}{CHAT}", chat_body("bench floor check")).status_code != 200:
                raise BenchError("the floor forwarder did not answer 200")
            scenarios.append(("passthrough", "floor", floor, lambda: unique_workload("bench floor")))
            scenarios.append(("passthrough", "miss", proxy, lambda: unique_workload("bench miss")))
            scenarios.append(("passthrough", "bypass", proxy, lambda: Workload.fixed(bypass_body, no_cache)))

        progress("warm-up: " + ", ".join(s[1] for s in scenarios))
        for _, _, server, make in scenarios:
            self.load(f"{server.url}{CHAT}", make(), 16, duration=min(1.0, self.args.duration))
        runs: dict[str, dict[int, list[LoadResult]]] = {s[1]: {c: [] for c in CONNECTIONS} for s in scenarios}
        counts: dict[str, dict[int, list[dict[str, int]]]] = {s[1]: {c: [] for c in CONNECTIONS} for s in scenarios}
        for r in range(self.args.rounds):
            order = scenarios[r % len(scenarios) :] + scenarios[: r % len(scenarios)]
            for conns in CONNECTIONS:
                progress(f"round {r + 1}/{self.args.rounds}, {conns} client(s): " + ", ".join(s[1] for s in order))
                for _, name, server, make in order:
                    before = self.metrics(server) if server is proxy else None
                    result = self.load(f"{server.url}{CHAT}", make(), conns)
                    runs[name][conns].append(result)
                    if before is not None:
                        after = self.metrics(server)
                        counts[name][conns].append(
                            {
                                k: after[k] - before[k]
                                for k in (
                                    "requests_total",
                                    "cache_hits",
                                    "cache_misses",
                                    "cache_bypass",
                                    "upstream_calls",
                                )
                            }
                        )
        for section, name, _, _ in scenarios:
            self.sections.setdefault(section, {}).setdefault("scenarios", {})[name] = {
                "runs": {str(c): [x.as_dict() for x in runs[name][c]] for c in CONNECTIONS},
                "proxy_counts": {str(c): counts[name][c] for c in CONNECTIONS} if counts[name][1] else None,
                "median": {
                    str(c): {
                        "rps": median(x.rps for x in runs[name][c]),
                        "p50_ms": median(x.p50_ms for x in runs[name][c]),
                        "p99_ms": median(x.p99_ms for x in runs[name][c]),
                    }
                    for c in CONNECTIONS
                },
            }
        self._http_rows(names, runs, counts)

    def _http_rows(
        self,
        names: list[str],
        runs: dict[str, dict[int, list[LoadResult]]],
        counts: dict[str, dict[int, list[dict[str, int]]]],
    ) -> None:
        def med(name: str, conns: int, attr: str) -> float | None:
            return median(getattr(x, attr) for x in runs[name][conns])

        def errors(*scenario_names: str) -> str:
            notes = []
            for name in scenario_names:
                for conns in CONNECTIONS:
                    for i, x in enumerate(runs.get(name, {}).get(conns, [])):
                        if x.errors:
                            notes.append(f"{name} c{conns} round {i + 1}: {x.error_text()}")
            return "; ".join(notes)

        def per_round_ratio(a: str, b: str, conns: int) -> float | None:
            if a not in runs or b not in runs:
                return None
            return median(x.rps / y.rps if y.rps else None for x, y in zip(runs[a][conns], runs[b][conns], strict=True))

        def per_round_added(a: str, b: str, conns: int) -> float | None:
            if a not in runs or b not in runs:
                return None
            return median(
                x.p50_ms - y.p50_ms if x.p50_ms is not None and y.p50_ms is not None else None
                for x, y in zip(runs[a][conns], runs[b][conns], strict=True)
            )

        def basic(section: str, name: str, label: str, base: str | None = None) -> None:
            flag = " (!)" if errors(name) else ""
            ratios = ""
            if base is not None:
                r1, r16 = per_round_ratio(name, base, 1), per_round_ratio(name, base, 16)
                ratios = f"{report.ratio(r1)} / {report.ratio(r16)}" if r16 is not None else f"n/a (no {base})"
            self.row(
                section,
                f"{label} req/s" + (f" (vs {base}: 1 / 16 clients)" if base else ""),
                report.rps(med(name, 1, "rps")) + flag,
                report.rps(med(name, 16, "rps")) + flag,
                ratios,
            )
            self.row(section, f"{label} p50", report.ms(med(name, 1, "p50_ms")), report.ms(med(name, 16, "p50_ms")))
            self.row(section, f"{label} p99", report.ms(med(name, 1, "p99_ms")), report.ms(med(name, 16, "p99_ms")))
            if errors(name):
                self.row(section, f"{label}: runs with errors", "yes (see notes)")
                self.notes.append(f"{section}: {errors(name)}")

        if "ceiling" in names:
            basic("ceiling", "ceiling", "ceiling (fixed bytes)")
        if "direct" in names:
            basic("direct", "direct", "direct to mock (unique)")
            basic("direct", "direct-stream", "info: direct, streamed", "direct")
        if "hits" in names:
            basic("hits", "hits", "cache hit", "ceiling")
            derived: dict[str, Any] = {
                "ratio_vs_ceiling": {str(c): per_round_ratio("hits", "ceiling", c) for c in CONNECTIONS}
            }
            self.sections["hits"]["derived"] = derived
            ratio16 = derived["ratio_vs_ceiling"]["16"]
            t = self.target(
                "hits",
                "cache hit req/s at 16 clients vs ceiling",
                ">= 0.50x ceiling @16",
                ratio16,
                report.ratio(ratio16),
                lambda v: v >= 0.5,
                errors("hits", "ceiling"),
            )
            self.row("hits", "hit req/s vs ceiling @16", "", "", report.ratio(ratio16), t)
            p50 = med("hits", 1, "p50_ms")
            t = self.target(
                "hits",
                "cache hit p50 at 1 client",
                "< 0.3 ms @1",
                p50,
                report.ms(p50),
                lambda v: v < 0.3,
                errors("hits"),
            )
            self.row("hits", "hit p50 @1", report.ms(p50), "", "", t)
            fractions = [
                c["cache_hits"] / c["requests_total"]
                for cs in counts["hits"].values()
                for c in cs
                if c["requests_total"]
            ]
            derived["hit_fraction_min"] = min(fractions, default=None)
            self.row(
                "hits",
                "X-Cache HIT share during load (proxy /metrics)",
                f"{min(fractions, default=0):.1%} (min of runs)",
            )
        if "passthrough" in names:
            derived: dict[str, dict[str, Any]] = {
                name: {
                    "ratio_vs_direct": {str(c): per_round_ratio(name, "direct", c) for c in CONNECTIONS},
                    "added_p50_ms": {str(c): per_round_added(name, "direct", c) for c in CONNECTIONS},
                }
                for name in ("floor", "miss", "bypass")
            }
            basic("passthrough", "floor", "info: floor (bare forwarder)", "direct")
            floor_added = derived["floor"]["added_p50_ms"]
            self.row(
                "passthrough",
                "info: floor added p50 (floor - direct)",
                report.signed_ms(floor_added["1"]),
                report.signed_ms(floor_added["16"]),
            )
            for name, label in (("miss", "miss (unique, cache on)"), ("bypass", "bypass (no-cache)")):
                basic("passthrough", name, label, "direct")
                ratio16 = per_round_ratio(name, "direct", 16)
                added = derived[name]["added_p50_ms"]
                problem = errors(name, "direct")
                if name == "miss":
                    t = self.target(
                        "passthrough",
                        "pass-through req/s at 16 clients vs direct",
                        ">= 0.50x direct @16",
                        ratio16,
                        report.ratio(ratio16),
                        lambda v: v >= 0.5,
                        problem,
                    )
                    self.row("passthrough", "miss req/s vs direct @16", "", "", report.ratio(ratio16), t)
                    t = self.target(
                        "passthrough",
                        "pass-through added p50 at 1 client (proxy - direct)",
                        "< 0.5 ms @1",
                        added["1"],
                        report.signed_ms(added["1"]),
                        lambda v: v < 0.5,
                        problem,
                    )
                    self.row(
                        "passthrough",
                        "miss added p50 (proxy - direct)",
                        report.signed_ms(added["1"]),
                        report.signed_ms(added["16"]),
                        "",
                        t,
                    )
                    own = {str(c): per_round_added(name, "floor", c) for c in CONNECTIONS}
                    derived[name]["added_over_floor_p50_ms"] = own
                    self.row(
                        "passthrough",
                        "info: miss added p50 over the floor",
                        report.signed_ms(own["1"]),
                        report.signed_ms(own["16"]),
                    )
                else:
                    self.row(
                        "passthrough",
                        "bypass added p50 (proxy - direct)",
                        report.signed_ms(added["1"]),
                        report.signed_ms(added["16"]),
                    )
                kind = {"miss": "cache_misses", "bypass": "cache_bypass"}[name]
                fractions = [
                    c[kind] / c["requests_total"] for cs in counts[name].values() for c in cs if c["requests_total"]
                ]
                derived[name]["x_cache_fraction_min"] = min(fractions, default=None)
                self.row(
                    "passthrough",
                    f"X-Cache {name.upper()} share during {name} load",
                    f"{min(fractions, default=0):.1%} (min of runs)",
                )
            self.sections["passthrough"]["derived"] = derived

    # ================================================================ 5: streaming
    def run_streaming(self) -> None:
        smock = self.start(mock_server("mock-stream", self.logs, *STREAM_SWITCHES))
        sproxy = self.proxy("proxy-stream", smock, self.tmp / "stream-cache")
        sfloor = self.start(floor_server("floor-stream", self.logs, smock))
        try:
            data = asyncio.run(self._streaming(smock, sproxy, sfloor))
        finally:
            self.stop(sfloor)
            self.stop(sproxy)
            self.stop(smock)
        self.sections["streaming"] = data
        s = data["summary"]
        self.notes.append(
            f"streaming: mock {' '.join(STREAM_SWITCHES)}; {data['requests']} sequential streamed "
            "requests per side (unique bodies: proxy MISSes), interleaved proxy/direct/floor; httpx "
            "client"
        )
        for what, label in (("ttft", "time to first token"), ("gap", "inter-chunk gap")):
            for q in ("p50", "p90"):
                self.row(
                    "streaming",
                    f"{label} {q}: direct / proxy",
                    f"{report.ms(s[what]['direct'][q])} / {report.ms(s[what]['proxy'][q])}",
                )
        problem = data["problems"]
        v = s["ttft"]["added"]["p50"]
        t = self.target(
            "streaming",
            "streaming added time to first token p50",
            "< 1 ms",
            v,
            report.signed_ms(v),
            lambda x: x < 1.0,
            problem,
        )
        self.row("streaming", "added time to first token p50", report.signed_ms(v), "", "", t)
        self.row("streaming", "added time to first token p90", report.signed_ms(s["ttft"]["added"]["p90"]))
        v = s["gap"]["added"]["p50"]
        t = self.target(
            "streaming",
            "streaming added inter-chunk gap p50",
            "< 0.2 ms",
            v,
            report.signed_ms(v),
            lambda x: x < 0.2,
            problem,
        )
        self.row("streaming", "added inter-chunk gap p50", report.signed_ms(v), "", "", t)
        self.row("streaming", "added inter-chunk gap p90", report.signed_ms(s["gap"]["added"]["p90"]))
        floor = (report.signed_ms(s["ttft"]["floor_added"]["p50"]), report.signed_ms(s["gap"]["floor_added"]["p50"]))
        self.row("streaming", "info: floor (bare forwarder) added time to first token / gap p50", " / ".join(floor))
        hit = s["hit_ttfb"]
        self.row(
            "streaming",
            f"streamed cache hit, time to first byte p50 / p90 (n={hit['n']})",
            f"{report.ms(hit['p50'])} / {report.ms(hit['p90'])}",
        )
        if problem:
            self.row("streaming", "problems", "yes (see notes)")
            self.notes.append(f"streaming problems: {problem}")

    async def _streaming(self, smock: ServerProcess, sproxy: ServerProcess, sfloor: ServerProcess) -> dict[str, Any]:
        n = self.args.stream_requests
        nonce = uuid.uuid4().hex[:12]
        urls = {"direct": f"{smock.url}{CHAT}", "proxy": f"{sproxy.url}{CHAT}", "floor": f"{sfloor.url}{CHAT}"}
        proxy_url = urls["proxy"]

        def body(side: str, i: int) -> bytes:
            return chat_body(
                f"bench stream {side} {nonce} {i}", max_tokens=64, stream=True, stream_options={"include_usage": True}
            )

        sides = ("proxy", "direct", "floor")
        samples: dict[str, list[clients.StreamSample]] = {side: [] for side in sides}
        problems: list[str] = []
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(3):  # warm-up: connections, the proxy's model list
                for side in sides:
                    await clients.timed_stream(client, urls[side], body("warm", i))
            progress(f"streaming: {n} requests per side, interleaved")
            for i in range(n):
                for side in sides[i % 3 :] + sides[: i % 3]:
                    sample = await clients.timed_stream(client, urls[side], body("proxy", i))
                    samples[side].append(sample)
                    if sample.status != 200 or not sample.done or sample.content_events == 0:
                        problems.append(
                            f"{side} #{i}: status {sample.status}, {sample.content_events} content "
                            f"events, [DONE] {'seen' if sample.done else 'missing'}"
                        )
                    elif side == "proxy" and sample.x_cache != "MISS":
                        problems.append(f"proxy #{i}: X-Cache {sample.x_cache}, expected MISS")
            hits: list[clients.StreamSample] = []
            for i in range(min(n, 50)):
                sample = await clients.timed_stream(client, proxy_url, body("proxy", i))
                hits.append(sample)
                if sample.status != 200 or sample.x_cache != "HIT":
                    problems.append(f"streamed hit #{i}: status {sample.status}, X-Cache {sample.x_cache}")

        def pct(values: list[float], q: float) -> float | None:
            value = loadgen.percentile(sorted(values), q)
            return None if value is None else value * 1000

        summary: dict[str, Any] = {}
        for what in ("ttft", "gap"):
            per_side = {}
            for side in sides:
                if what == "ttft":
                    values = [s.ttft for s in samples[side] if s.ttft is not None]
                else:
                    values = [g for s in samples[side] for g in s.gaps]
                per_side[side] = {"n": len(values), "p50": pct(values, 50), "p90": pct(values, 90)}
            added, floor_added = (
                {
                    q: (
                        per_side[side][q] - per_side["direct"][q]
                        if per_side[side][q] is not None and per_side["direct"][q] is not None
                        else None
                    )
                    for q in ("p50", "p90")
                }
                for side in ("proxy", "floor")
            )
            summary[what] = {**per_side, "added": added, "floor_added": floor_added}
        ttfb = [s.ttfb for s in hits if s.ttfb is not None]
        summary["hit_ttfb"] = {"n": len(ttfb), "p50": pct(ttfb, 50), "p90": pct(ttfb, 90)}
        return {
            "requests": n,
            "mock_switches": list(STREAM_SWITCHES),
            "summary": summary,
            "problems": "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""),
            "raw_ms": {
                side: {"ttft": [round(s.ttft * 1000, 4) for s in samples[side] if s.ttft is not None]}
                for side in samples
            },
        }

    # ================================================================ 6: coalescing
    def run_coalescing(self) -> None:
        cmock = self.start(mock_server("mock-slow", self.logs, *SLOW_SWITCHES))
        cproxy = self.proxy("proxy-coalesce", cmock, self.tmp / "coalesce-cache")
        n = self.args.coalesce_clients
        runs = []
        try:
            for r in range(self.args.rounds):
                progress(f"coalescing: round {r + 1}/{self.args.rounds}, {n} identical concurrent requests")
                body = chat_body(f"bench coalesce {uuid.uuid4().hex[:12]}")
                gens, metrics = self.generations(cmock), self.metrics(cproxy)
                run = asyncio.run(clients.coalesce(f"{cproxy.url}{CHAT}", body, n))
                gens_after, metrics_after = self.generations(cmock), self.metrics(cproxy)
                times_ms = [t * 1000 for t in run.completion_s]
                runs.append(
                    {
                        "clients": n,
                        "upstream_calls_mock": gens_after - gens,
                        "upstream_calls_proxy": metrics_after["upstream_calls"] - metrics["upstream_calls"],
                        "coalesced_proxy": metrics_after["coalesced_requests"] - metrics["coalesced_requests"],
                        "statuses": run.statuses,
                        "x_cache": run.x_cache,
                        "distinct_bodies": run.distinct_bodies,
                        "completion_p50_ms": loadgen.percentile(times_ms, 50),
                        "completion_min_ms": times_ms[0],
                        "completion_max_ms": times_ms[-1],
                        "spread_ms": times_ms[-1] - times_ms[0],
                        "send_ms": run.send_s * 1000,
                    }
                )
        finally:
            self.stop(cproxy)
            self.stop(cmock)
        self.sections["coalescing"] = {"mock_switches": list(SLOW_SWITCHES), "runs": runs}
        calls = [r["upstream_calls_mock"] for r in runs]
        ok_200 = [r["statuses"].get("200", 0) for r in runs]
        worst = max(calls, key=lambda c: abs(c - 1))
        problem = "" if all(x == n for x in ok_200) else f"only {min(ok_200)}/{n} answered 200"
        t = self.target(
            "coalescing",
            f"upstream calls for {n} identical concurrent requests",
            "exactly 1",
            float(worst),
            str(worst),
            lambda v: v == 1,
            problem,
        )
        self.row(
            "coalescing",
            f"upstream calls (mock /mock/stats), {n} clients, per round",
            ", ".join(map(str, calls)),
            "",
            "",
            t,
        )
        self.row("coalescing", "answered 200 (all rounds)", f"{sum(ok_200)}/{n * len(runs)}")
        self.row("coalescing", "distinct answer bodies per round", ", ".join(str(r["distinct_bodies"]) for r in runs))
        labels: dict[str, int] = {}
        for r in runs:
            for k, v in r["x_cache"].items():
                labels[k] = labels.get(k, 0) + v
        self.row("coalescing", "X-Cache labels (all rounds)", " ".join(f"{k}={v}" for k, v in sorted(labels.items())))
        self.row(
            "coalescing",
            "completion time p50 (upstream first token after 1 s)",
            report.ms(median(r["completion_p50_ms"] for r in runs)),
        )
        self.row("coalescing", "completion spread (max - min)", report.ms(median(r["spread_ms"] for r in runs)))
        self.row("coalescing", "client: all requests written within", report.ms(median(r["send_ms"] for r in runs)))

    # ================================================================ 7: memory
    def run_memory(self) -> None:
        tiers = self.tiers()
        dirs = {n: self.dataset(n) for n in tiers}
        mock = self.mock()
        # one unmeasured start first: later starts then all find the interpreter and libraries in the page cache
        self.stop(self.proxy("proxy-mem-warmup", mock, self.tmp / "warmup-cache"))
        results: dict[str, list[dict[str, Any]]] = {"empty": [], **{str(n): [] for n in tiers}}
        for r in range(self.args.rounds):
            for label in ["empty", *map(str, tiers)]:
                progress(f"memory: round {r + 1}/{self.args.rounds}, proxy on {label} cache")
                if label == "empty":
                    cache_dir = self.tmp / f"empty-cache-{r}"
                    n = 0
                else:
                    n = int(label)
                    cache_dir = dirs[n].path
                proxy = self.proxy(f"proxy-mem-{label}-{r}", mock, cache_dir)
                try:
                    entry: dict[str, Any] = {"startup_s": proxy.startup_seconds, "indexed_s": self.index_loaded(proxy)}
                    entry["rss_start_kib"] = proxy.rss_kib()
                    entry["cache_entries"] = self.metrics(proxy)["cache_entries"]
                    if n:
                        indexes = [(k * n) // MEMORY_HITS for k in range(MEMORY_HITS)]
                        bodies = [orjson.dumps(cachefill.request_body(i)) for i in indexes]
                        served = asyncio.run(clients.serve_batch(f"{proxy.url}{CHAT}", bodies))
                        entry["hits_served"] = served
                        if served["x_cache"].get("HIT", 0) != len(bodies):
                            raise BenchError(
                                f"memory: of {len(bodies)} requests for pre-filled entries, "
                                f"X-Cache counts were {served['x_cache']} (expected all HIT)"
                            )
                        entry["rss_after_hits_kib"] = proxy.rss_kib()
                finally:
                    self.stop(proxy)
                results[label].append(entry)
        self.sections["memory"] = {
            "tiers": tiers,
            "datasets": {str(n): dirs[n].summary() for n in tiers},
            "runs": results,
        }

        def med(label: str, key: str) -> float | None:
            return median(e.get(key) for e in results[label])

        idle = med("empty", "rss_start_kib")
        t = self.target(
            "memory", "RSS idle (fresh start, empty cache)", "< 80 MiB", idle, report.mib(idle), lambda v: v < 80 * 1024
        )
        self.row("memory", "RSS idle (fresh start, empty cache)", report.mib(idle), "", "", t)
        largest = str(tiers[-1])
        for label in map(str, tiers):
            start, after = med(label, "rss_start_kib"), med(label, "rss_after_hits_kib")
            name = f"RSS with {report.count_label(int(label))} entries: at start / after {MEMORY_HITS} hits"
            if label == largest:
                worst = max(v for v in (start, after) if v is not None) if (start or after) else None
                t = self.target(
                    "memory",
                    f"RSS with {report.count_label(int(label))} entries (max of start, after hits)",
                    "< 150 MiB",
                    worst,
                    report.mib(worst),
                    lambda v: v < 150 * 1024,
                )
                self.row("memory", name, f"{report.mib(start)} / {report.mib(after)}", "", "", t)
            else:
                self.row("memory", name, f"{report.mib(start)} / {report.mib(after)}")
        self.row(
            "memory", "start-up, empty cache (process start to /health 200)", report.seconds(med("empty", "startup_s"))
        )
        up = med(largest, "startup_s")
        entries = [e["cache_entries"] for e in results[largest]]
        problem = "" if all(e == int(largest) for e in entries) else f"cache_entries {entries} != {largest}"
        t = self.target(
            "memory",
            f"start-up with {report.count_label(int(largest))} entries",
            "< 2 s",
            up,
            report.seconds(up),
            lambda v: v < 2.0,
            problem,
        )
        self.row(
            "memory",
            f"start-up, {report.count_label(int(largest))} entries (to /health 200; serving)",
            report.seconds(up),
            "",
            "",
            t,
        )
        self.row(
            "memory",
            f"index loaded, {report.count_label(int(largest))} entries (cache_loading false)",
            report.seconds(med(largest, "indexed_s")),
        )
        self.row(
            "memory",
            f"cache_entries in /metrics after start ({report.count_label(int(largest))})",
            ", ".join(map(str, entries)),
        )

    # ================================================================ 8: scaling
    def run_scaling(self) -> None:
        tiers = self.tiers()
        small, large = tiers[0], tiers[-1]
        mock = self.mock()
        small_dir, large_dir = self.dataset(small), self.dataset(large)
        full_dir = cachefill.link_subset(large_dir, self.tmp / "evict-full", small)
        roomy_dir = cachefill.link_subset(large_dir, self.tmp / "evict-roomy", small)
        p_small = self.proxy("proxy-scale-small", mock, small_dir.path)
        p_large = self.proxy("proxy-scale-large", mock, large_dir.path)
        p_full = self.proxy("proxy-evict-full", mock, full_dir.path, max_entries=small)
        p_roomy = self.proxy("proxy-evict-roomy", mock, roomy_dir.path)
        try:
            self._scaling(small, large, p_small, p_large, p_full, p_roomy)
        finally:
            for server in (p_roomy, p_full, p_large, p_small):
                self.stop(server)

    def _scaling(
        self,
        small: int,
        large: int,
        p_small: ServerProcess,
        p_large: ServerProcess,
        p_full: ServerProcess,
        p_roomy: ServerProcess,
    ) -> None:
        def spread(n: int) -> list[bytes]:
            count = min(n, SCALING_BODIES)
            return [orjson.dumps(cachefill.request_body((k * n) // count)) for k in range(count)]

        bodies = {"small": spread(small), "large": spread(large)}
        for label, proxy in (("small", p_small), ("large", p_large)):
            checked = asyncio.run(
                clients.serve_batch(f"{proxy.url}{CHAT}", bodies[label][:: max(1, len(bodies[label]) // 20)])
            )
            if checked["x_cache"].get("HIT", 0) != checked["requests"]:
                raise BenchError(
                    f"scaling: requests for pre-filled entries ({label}) got X-Cache {checked['x_cache']}"
                    " (expected all HIT: the entries' keys do not match what the proxy computes)"
                )
        entries = self.metrics(p_full)["cache_entries"]
        if entries != small:
            raise BenchError(f"scaling: the full proxy holds {entries} entries, expected {small}")
        scenarios = ["small", "large", "full", "roomy"]
        servers = {"small": p_small, "large": p_large, "full": p_full, "roomy": p_roomy}
        runs: dict[str, list[LoadResult]] = {s: [] for s in scenarios}
        counts: dict[str, list[dict[str, int]]] = {s: [] for s in scenarios}
        for r in range(self.args.rounds):
            nonce = uuid.uuid4().hex[:12]  # the same misses for the full and the roomy cache
            workloads = {
                "small": Workload.cycle(bodies["small"]),
                "large": Workload.cycle(bodies["large"]),
                "full": unique_workload("bench evict", nonce=nonce),
                "roomy": unique_workload("bench evict", nonce=nonce),
            }
            order = scenarios[r % 4 :] + scenarios[: r % 4]
            progress(f"scaling: round {r + 1}/{self.args.rounds}, 1 client: {', '.join(order)}")
            for name in order:
                before = self.metrics(servers[name])
                runs[name].append(self.load(f"{servers[name].url}{CHAT}", workloads[name], 1))
                after = self.metrics(servers[name])
                counts[name].append(
                    {
                        k: after[k] - before[k]
                        for k in ("requests_total", "cache_hits", "cache_misses", "cache_evictions", "upstream_calls")
                    }
                )
        self.sections["scaling"] = {
            "small_entries": small,
            "large_entries": large,
            "bodies_cycled": {k: len(v) for k, v in bodies.items()},
            "runs": {k: [x.as_dict() for x in v] for k, v in runs.items()},
            "proxy_counts": counts,
        }

        def med(name: str, attr: str) -> float | None:
            return median(getattr(x, attr) for x in runs[name])

        def rr(a: str, b: str, attr: str) -> float | None:
            return median(
                getattr(x, attr) / getattr(y, attr) if getattr(y, attr) else None
                for x, y in zip(runs[a], runs[b], strict=True)
            )

        def problem(*names: str) -> str:
            notes = [f"{n} round {i + 1}: {x.error_text()}" for n in names for i, x in enumerate(runs[n]) if x.errors]
            return "; ".join(notes)

        hit_share = min(
            (
                c["cache_hits"] / c["requests_total"]
                for n in ("small", "large")
                for c in counts[n]
                if c["requests_total"]
            ),
            default=0,
        )
        s_label, l_label = report.count_label(small), report.count_label(large)
        ratio_v = rr("large", "small", "p50_ms")
        t = self.target(
            "scaling",
            f"hit p50 at 1 client, {l_label} vs {s_label} entries",
            "flat (<= 1.20x)",
            ratio_v,
            report.ratio(ratio_v),
            lambda v: v <= 1.2,
            problem("small", "large") or ("" if hit_share == 1 else f"HIT share {hit_share:.1%}"),
        )
        self.row(
            "scaling",
            f"hit p50 @1: {s_label} / {l_label} entries",
            f"{report.ms(med('small', 'p50_ms'))} / {report.ms(med('large', 'p50_ms'))}",
            "",
            report.ratio(ratio_v),
            t,
        )
        self.row(
            "scaling",
            f"hit p99 @1: {s_label} / {l_label} entries",
            f"{report.ms(med('small', 'p99_ms'))} / {report.ms(med('large', 'p99_ms'))}",
            "",
            report.ratio(rr("large", "small", "p99_ms")),
            target_text="info (noisy)",
        )
        self.row("scaling", "X-Cache HIT share during scaling load", f"{hit_share:.1%} (min of runs)")
        ratio_v = rr("full", "roomy", "p50_ms")
        self.row(
            "scaling",
            f"miss p50 @1: not full / full ({s_label} entries, evicting)",
            f"{report.ms(med('roomy', 'p50_ms'))} / {report.ms(med('full', 'p50_ms'))}",
            "",
            report.ratio(ratio_v),
            target_text="info",
        )
        evictions = [c["cache_evictions"] for c in counts["full"]]
        self.sections["scaling"]["derived"] = {
            "hit_ratio_large_small": {q: rr("large", "small", q) for q in ("p50_ms", "p99_ms")},
            "miss_ratio_full_roomy_p50": ratio_v,
            "hit_share_min": hit_share,
        }
        self.row("scaling", "evictions during the full-cache runs", ", ".join(map(str, evictions)))
        if problem("small", "large", "full", "roomy"):
            self.row("scaling", "runs with errors", "yes (see notes)")
            self.notes.append(f"scaling: {problem('small', 'large', 'full', 'roomy')}")


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, help="interleaved rounds per comparison (default 3; --quick 1)")
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds per load measurement (default 3; --quick 1; wrk rounds to whole seconds)",
    )
    parser.add_argument("--quick", action="store_true", help="about 2 minutes: 1 round, short measurements")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument(
        "--json", type=Path, help="where to write the results (default bench/results/bench-<UTC timestamp>.json)"
    )
    parser.add_argument(
        "--entries",
        type=int,
        default=100_000,
        help="largest pre-filled cache for memory/scaling (default 100000; 1k and 10k tiers below it)",
    )
    parser.add_argument(
        "--stream-requests", type=int, help="sequential streamed requests per side (default 100; --quick 30)"
    )
    parser.add_argument("--coalesce-clients", type=int, default=100, help="identical concurrent requests (100)")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk, installed with apt-get if missing and possible, else the Python fallback",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="kilo_turn: also run the proxy of this checkout (e.g. a git "
        "worktree of the commit before a change), side by side with this one's",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed for the pre-filled entries' sizes")
    args = parser.parse_args(argv)
    defaults = {"rounds": (3, 1), "duration": (3.0, 1.0), "stream_requests": (100, 30)}
    for name, (normal, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in names if s not in SECTIONS]
        if unknown or not names:
            parser.error(
                f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}"
            )
        args.sections = [s for s in SECTIONS if s in names]
    else:
        args.sections = list(SECTIONS)
    if args.rounds < 1 or args.rounds > 50:
        parser.error("--rounds: 1 to 50")
    if not 0.1 <= args.duration <= 600:
        parser.error("--duration: 0.1 to 600 seconds")
    if args.entries < 10 or args.entries > 2_000_000:
        parser.error("--entries: 10 to 2000000")
    if not 1 <= args.stream_requests <= 10_000:
        parser.error("--stream-requests: 1 to 10000")
    if not 2 <= args.coalesce_clients <= 1000:
        parser.error("--coalesce-clients: 2 to 1000")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both unwind through the finally below (even when started with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc)
    json_path = args.json or ROOT / "bench" / "results" / f"bench-{now:%Y%m%dT%H%M%SZ}.json"

    if args.loadgen == "python":
        wrk = None
    elif args.loadgen == "wrk":
        wrk = loadgen.find_wrk()
        if wrk is None:
            print("bench_proxy: --loadgen wrk but wrk is not installed", file=sys.stderr)
            return 2
    else:
        wrk = loadgen.ensure_wrk(lambda m: progress(m))
        if wrk is None:
            progress("falling back to the Python load generator (figures not comparable with wrk's)")

    meta = {
        "started_utc": now.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine_info(loadgen.find_wrk()),
        "loadgen": "wrk" if wrk else "python-fallback",
    }
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
    tmp = Path(tempfile.mkdtemp(prefix="llmpod-bench-"))
    bench = Bench(args, tmp, wrk)
    interrupted = False
    try:
        http = [s for s in args.sections if s in HTTP_SECTIONS]
        plan: list[tuple[str, Callable[[], None]]] = []
        if http:
            plan.append((",".join(http), lambda: bench.run_http(http)))
        plan += [
            (s, getattr(bench, f"run_{s}"))
            for s in ("streaming", "coalescing", "memory", "scaling")
            if s in args.sections
        ]
        if "kilo_turn" in args.sections:
            plan.append(("kilo_turn", lambda: kilo_bench.run(bench)))
        for label, run in plan:
            progress(f"== {label}")
            try:
                run()
            except Exception as exc:  # report the section as broken and carry on with the others
                message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BenchError) else str(exc)
                for section in label.split(","):
                    bench.errors[section] = message
                progress(f"{label} broke: {message}")
                if not isinstance(exc, BenchError):
                    traceback.print_exc(file=sys.stderr)
                # a broken section may leave its servers up: stop them before the next one
                bench.stop_all()
                bench._mock = None
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: stopping the servers")
    finally:
        # cleanup is bounded (SIGTERM, then SIGKILL after a grace period): a second Ctrl-C must not cut it short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if interrupted:
        return 130

    elapsed = time.perf_counter() - started
    machine = meta["machine"]
    header = [
        f"llmpod proxy benchmark, commit {meta['git']['commit']}, {meta['started_utc']}, {elapsed:.0f} s",
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_total_gib']} GiB RAM, "
        f"Python {machine['python']}, uvloop {machine['uvloop'] or 'MISSING'}, "
        f"httptools {machine['httptools'] or 'MISSING'}, wrk {machine['wrk'] or 'MISSING'}",
        (
            f"load: wrk -t1 -c1/-c16, {loadgen.wrk_seconds(args.duration)} s per measurement"
            if wrk
            else f"load: PYTHON FALLBACK load generator (wrk unavailable), {args.duration:g} s per measurement; "
            "figures are NOT comparable with wrk's"
        )
        + f"; {args.rounds} interleaved round(s), medians of rounds; sections: {', '.join(args.sections)}",
    ]
    table = report.format_table(bench.rows, bench.errors)
    passed = sum(1 for t in bench.targets if t.passed is True)
    failed = sum(1 for t in bench.targets if t.passed is False)
    unknown = sum(1 for t in bench.targets if t.passed is None)
    print("\n".join(header))
    print(table)
    print(f"targets: {passed} PASS, {failed} FAIL" + (f", {unknown} not measured/with errors" if unknown else ""))
    for note in bench.notes:
        print(f"note: {note}")
    for section, message in bench.errors.items():
        print(f"ERROR in {section}: {message}")

    result = {
        "meta": {**meta, "elapsed_s": round(elapsed, 1)},
        "settings": settings,
        "sections": bench.sections,
        "targets": [t.as_dict() for t in bench.targets],
        "rows": [r.__dict__ for r in bench.rows],
        "errors": bench.errors,
        "notes": bench.notes,
        "ports": bench.ports,
        "table": table,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"results: {json_path}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
