"""The ``kilo_turn`` section: what the proxy adds to a Kilo Code turn's time to first token behind a WAN.

Kilo Code sends about 55 KB (system prompt, 16 tools, the conversation) with ``max_tokens`` 32000 on every
turn, and a turn never repeats. Each case runs sessions of such turns (``bench/kilo_turn.py``) through a proxy to
``bench/wan_relay.py``, which makes the mock look like a vLLM pod behind RunPod's proxy: 80 ms per call, and the
context checks of vLLM 0.33.0 (lowers ``max_tokens`` itself) or 0.27.1 (refuses prompt + ``max_tokens`` over the
context). Cases: each release, through this checkout's proxy ("after") and, with ``--before DIR``, through the
proxy of another checkout ("before", e.g. ``git worktree add /tmp/fit-before f2588bc``). The same turns go
directly to the relay too, with ``max_tokens`` already fitted as an ideal client would (not timed): the added
time to first token is proxy minus direct, turn by turn, the median over all turns. Turns are interleaved across
cases, so the machine's noise falls on all of them alike.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from bench import clients, kilo_turn, loadgen, report
from bench.servers import ServerProcess, base_env, mock_server, proxy_server

if TYPE_CHECKING:
    from bench.bench_proxy import Bench

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ("0.33.0", "0.27.1")
CONTEXT = 32768  # a Kilo Code model's context (Qwen2.5-Coder-32B-Instruct serves 32768)
DELAY = 0.08
SESSIONS = 3
TURNS = 8  # per session: 55 KB growing to about 75 KB
# a pod serving an agent: tool calling on (a mock that speaks vLLM 0.33 refuses tools without it, as vLLM does)
MOCK_SWITCHES = (
    "--max-model-len",
    str(CONTEXT),
    "--chunk-count",
    "8",
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
)
CHAT = "/v1/chat/completions"


def relay_server(name: str, log_dir: Path, upstream: ServerProcess, release: str) -> ServerProcess:
    argv = [
        sys.executable,
        str(ROOT / "bench" / "wan_relay.py"),
        "--port",
        "{port}",
        "--upstream",
        upstream.url,
        "--delay",
        str(DELAY),
        "--release",
        release,
        "--max-model-len",
        str(CONTEXT),
    ]
    return ServerProcess(name, argv, base_env({}), log_dir / f"{name}.log", health_path="/relay/stats")


def run(bench: Bench) -> None:
    before: Path | None = bench.args.before
    codes = {"after": ROOT, **({"before": before} if before else {})}
    mock = bench.start(mock_server("mock-kilo", bench.logs, *MOCK_SWITCHES))
    relays = {release: bench.start(relay_server(f"relay-{release}", bench.logs, mock, release)) for release in RELEASES}
    proxies = {
        (release, code): bench.start(
            proxy_server(
                f"proxy-{code}-{release}", bench.logs, relays[release], bench.tmp / f"kilo-{code}-{release}", root=root
            )
        )
        for release in RELEASES
        for code, root in codes.items()
    }
    data = asyncio.run(_measure(mock, relays, proxies))
    bench.sections["kilo_turn"] = data
    bench.notes.append(
        f"kilo_turn: {data['turns']} turns per case ({SESSIONS} sessions of {TURNS}), body "
        f"{data['body_bytes'][0]}-{data['body_bytes'][1]} bytes ({data['source']}), relay "
        f"{DELAY * 1000:.0f} ms per call, context {CONTEXT}; direct: the same turn fitted by "
        "the client"
    )
    for release in RELEASES:
        for code in codes:
            case = data["cases"][f"{code} {release}"]
            bench.row(
                "kilo_turn",
                f"{code}: vLLM {release}, added TTFT p50 / p90 (direct p50 "
                f"{report.ms(data['direct'][release]['p50'])})",
                f"{report.signed_ms(case['added_p50'])} / {report.signed_ms(case['added_p90'])}",
            )
            bench.row(
                "kilo_turn",
                f"{code}: vLLM {release}, upstream calls per turn",
                ", ".join(f"{path} {n / data['turns']:.2f}" for path, n in sorted(case["calls"].items())),
            )
            if case["problems"]:
                bench.row("kilo_turn", f"{code}: vLLM {release}, problems", "yes (see notes)")
                bench.notes.append(f"kilo_turn {code} {release}: {case['problems']}")


async def _measure(
    mock: ServerProcess, relays: dict[str, ServerProcess], proxies: dict[tuple[str, str], ServerProcess]
) -> dict[str, Any]:
    sides = [("direct", release) for release in RELEASES] + [(code, release) for release, code in proxies]
    ttft: dict[tuple[str, str], list[float | None]] = {side: [] for side in sides}
    calls: dict[tuple[str, str], Counter[str]] = {side: Counter() for side in sides}
    problems: dict[tuple[str, str], list[str]] = {side: [] for side in sides}
    sizes: list[int] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for proxy in proxies.values():  # warm-up: the proxy's model list and /version, off the clock
            await client.get(f"{proxy.url}/v1/models")
        for session in range(SESSIONS):
            nonce = uuid.uuid4().hex[:10]
            turns = {side: kilo_turn.session(TURNS, "m", f"{nonce} {side}") for side in sides}
            for number in range(TURNS):
                shift = (session * TURNS + number) % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    body = turns[side][number]
                    sizes.append(len(orjson.dumps(body)))
                    relay = relays[side[1]]
                    if side[0] == "direct":
                        body = await _fitted(client, mock, body)
                        url = f"{relay.url}{CHAT}"
                    else:
                        url = f"{proxies[(side[1], side[0])].url}{CHAT}"
                    counted = await _calls(client, relay)
                    sample = await clients.timed_stream(client, url, orjson.dumps(body))
                    calls[side].update(await _calls(client, relay))
                    calls[side].subtract(counted)
                    ttft[side].append(sample.ttft)
                    if sample.status != 200 or not sample.done or sample.ttft is None:
                        problems[side].append(
                            f"session {session} turn {number}: status {sample.status}, [DONE] "
                            f"{'seen' if sample.done else 'missing'}"
                        )

    def pct(values: list[float], q: float) -> float | None:
        value = loadgen.percentile(sorted(values), q)
        return None if value is None else value * 1000

    def ms_list(values: list[float | None]) -> list[float | None]:
        return [None if t is None else round(t * 1000, 3) for t in values]

    result: dict[str, Any] = {
        "turns": SESSIONS * TURNS,
        "delay_ms": DELAY * 1000,
        "context": CONTEXT,
        "body_bytes": [min(sizes), max(sizes)],
        "source": "recorded fixture" if kilo_turn.FIXTURE.exists() else "synthetic",
        "direct": {
            release: {
                "p50": pct([t for t in ttft[("direct", release)] if t is not None], 50),
                "ttft_ms": ms_list(ttft[("direct", release)]),
            }
            for release in RELEASES
        },
        "cases": {},
    }
    for release, code in proxies:
        side = (code, release)
        added = [
            p - d for p, d in zip(ttft[side], ttft[("direct", release)], strict=True) if p is not None and d is not None
        ]
        result["cases"][f"{code} {release}"] = {
            "added_p50": pct(added, 50),
            "added_p90": pct(added, 90),
            "calls": {path: n for path, n in calls[side].items() if n and not path.startswith("/relay")},
            "ttft_ms": ms_list(ttft[side]),
            "problems": "; ".join(problems[side][:5]),
        }
    return result


async def _calls(client: httpx.AsyncClient, relay: ServerProcess) -> Counter[str]:
    return Counter((await client.get(f"{relay.url}/relay/stats")).json())


async def _fitted(client: httpx.AsyncClient, mock: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    """The body as an ideal client would send it: ``max_tokens`` fitted with the mock's count (untimed)."""
    counted = await client.post(
        f"{mock.url}/tokenize", json={"model": body["model"], "messages": body["messages"], "tools": body.get("tools")}
    )
    room = CONTEXT - int(counted.json()["count"])
    return {**body, "max_tokens": min(body["max_tokens"], room)}
