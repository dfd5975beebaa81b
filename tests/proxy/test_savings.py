"""Hit rates that mean something (all-time, the last N lookups, the last hour; per client family) and what the
cache saved (tokens, generation seconds, dollars at the pod's $/h), in /metrics JSON and Prometheus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest

from llmpod.proxy import metrics as proxy_metrics
from llmpod.proxy._cache_stream import StoredAnswer
from llmpod.proxy.cache import LARGE_BYTES, ResponseCache
from llmpod.proxy.clients import FAMILIES, client_family
from tests.fakes.fake_provider import FakeClock
from tests.proxy.test_app import chat
from tests.proxy.test_large_answers import big_entry
from tests.support.helpers import ProxyFactory, wait_for_stored

FIXTURES = Path(__file__).parent.parent / "fixtures" / "clients"
# the mock takes 0.2 s to its first token: an answer's generation time is at least that
SLOW = {"first_token_delay": 0.2, "chunk_delay": 0.01, "chunk_count": 6}


def fixture_headers(name: str) -> dict[str, str]:
    headers = json.loads((FIXTURES / f"{name}.json").read_text())["headers"]
    return {k: v for k, v in headers.items() if k in ("user-agent", "x-title", "x-stainless-raw-response")}


def family(headers: dict[str, str]) -> str:
    return client_family([(k.lower().encode(), v.encode()) for k, v in headers.items()])


KILO, CONTINUE, AIDER = fixture_headers("kilo_turn"), fixture_headers("continue_turn"), fixture_headers("aider")
OPENAI_NODE = fixture_headers("openai_node")


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("kilo_turn", "kilo"),
        ("kilo_turn_after_tool", "kilo"),
        ("continue_turn", "continue"),
        ("aider", "aider"),
        ("openai_python", "openai-python"),
        ("openai_node", "openai-node"),
        ("ai_sdk", "ai-sdk"),
    ],
)
def test_recorded_clients_are_told_apart(fixture: str, expected: str) -> None:
    assert family(fixture_headers(fixture)) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"user-agent": "Kilo-Code/5.2.0", "x-title": "Kilo Code"}, "kilo"),  # the legacy extension
        ({"user-agent": "RooCode/3.25.0", "x-title": "Roo Code"}, "roo"),
        ({"user-agent": "OpenAI/JS 5.12.2", "x-title": "Cline"}, "cline"),  # Cline's own is openai-node's
        ({"user-agent": "curl/8.5.0"}, "curl"),
        ({"user-agent": "python-httpx/0.28.1"}, "other"),
        ({}, "other"),
        ({"user-agent": "x" * 100_000}, "other"),
    ],
)
def test_other_clients_and_unknown_ones(headers: dict[str, str], expected: str) -> None:
    assert family(headers) == expected


def test_windows_recent_and_last_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recent window holds the last N lookups, the hour the last 60 minutes; all-time keeps everything."""
    clock = FakeClock()
    monkeypatch.setattr(proxy_metrics, "time", clock)
    metrics = proxy_metrics.ProxyMetrics(cast(Any, None), window=3, cost_per_hour=3.6)
    for _ in range(4):  # an hour ago: four hits for kilo, each saving 10 tokens and 2 s of generation
        metrics.record(model="m", status=200, cache="HIT", seconds=0.001, cached_tokens=10, client="kilo",
                       saved_seconds=2.0)  # fmt: skip
    clock.advance(3601)
    metrics.record(model="m", status=200, cache="MISS", seconds=1.0, client="aider")
    metrics.record(model="m", status=200, cache="BYPASS", seconds=1.0, client="aider")  # not a lookup
    metrics.record(model="m", status=200, cache="COALESCED", seconds=1.0, client="aider")
    windows, clients = metrics.windows.as_json(clock.time())
    assert windows["all_time"] == {
        "lookups": 6,
        "hits": 4,
        "hit_rate": 0.6667,
        "tokens_saved": 40,
        "generation_seconds_saved": 8.0,
        "usd_saved": 0.008,  # 8 s at $3.60/h
    }
    assert (windows["recent"]["size"], windows["recent"]["lookups"], windows["recent"]["hits"]) == (3, 3, 1)
    assert (windows["last_hour"]["lookups"], windows["last_hour"]["hits"]) == (2, 0)
    assert clients["kilo"]["all_time"]["hit_rate"] == 1.0 and clients["kilo"]["last_hour"]["lookups"] == 0
    assert clients["kilo"]["recent"]["lookups"] == 1
    assert clients["aider"]["all_time"] == {**clients["aider"]["last_hour"], "lookups": 2, "hits": 0}


@pytest.mark.parametrize("mock_vllm_settings", [SLOW])
async def test_mixed_clients_through_the_proxy(start_proxy: ProxyFactory, mock_vllm_settings: dict[str, Any]) -> None:
    proxy = start_proxy(hit_rate_window=4, cost_per_hour=3.6)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        sends = [
            (KILO, "kilo task"),  # MISS
            (KILO, "kilo task"),  # HIT
            (CONTINUE, "continue task"),  # MISS
            (KILO, "kilo task"),  # HIT
            (AIDER, "aider task"),  # MISS
            (AIDER, "aider task"),  # HIT
            ({"user-agent": "my-script/1.0"}, "kilo task"),  # HIT, for "other"
        ]
        outcomes, tokens = [], 0
        for headers, question in sends:
            answer = await http.post("/v1/chat/completions", json=chat(question), headers=headers)
            outcomes.append(answer.headers["x-cache"])
            if answer.headers["x-cache"] == "MISS":
                tokens = answer.json()["usage"]["completion_tokens"]
                with httpx.Client(base_url=proxy.url) as sync:
                    wait_for_stored(sync, outcomes.count("MISS"))
        metrics = (await http.get("/metrics")).json()
        prometheus = (await http.get("/metrics", params={"format": "prometheus"})).text
    assert outcomes == ["MISS", "HIT", "MISS", "HIT", "MISS", "HIT", "HIT"]
    windows, clients = metrics["windows"], metrics["clients"]
    assert (windows["all_time"]["lookups"], windows["all_time"]["hits"]) == (7, 4)
    assert (windows["recent"]["lookups"], windows["recent"]["hits"]) == (4, 3)  # HIT MISS HIT HIT
    assert (windows["last_hour"]["lookups"], windows["last_hour"]["hits"]) == (7, 4)
    assert metrics["cache_hit_rate"] == windows["all_time"]["hit_rate"] == round(4 / 7, 4)
    assert sorted(clients) == ["aider", "continue", "kilo", "other"]
    assert clients["kilo"]["all_time"]["hit_rate"] == round(2 / 3, 4)
    assert clients["continue"]["all_time"]["hits"] == 0 and clients["other"]["all_time"]["hit_rate"] == 1.0
    # what the hits saved: each answer's completion tokens and generation time (the mock takes >= 0.2 s)
    saved = windows["all_time"]
    assert saved["tokens_saved"] == metrics["tokens_served_from_cache"] == 4 * tokens
    assert saved["generation_seconds_saved"] >= 4 * 0.2
    assert saved["usd_saved"] == metrics["usd_saved"] == pytest.approx(saved["generation_seconds_saved"] / 1000, 1e-3)
    assert metrics["cost_per_hour"] == 3.6
    assert 'llm_proxy_client_requests_total{cache="HIT",client="kilo"} 2.0' in prometheus
    assert 'llm_proxy_client_cache_served_tokens_total{client="aider"}' in prometheus
    assert 'llm_proxy_client_usd_saved_total{client="other"}' in prometheus
    assert 'llm_proxy_cache_hit_ratio{window="recent"} 0.75' in prometheus


@pytest.mark.parametrize("mock_vllm_settings", [SLOW])
async def test_local_pod_saves_no_dollars_and_old_entries_count_tokens_only(
    start_proxy: ProxyFactory, mock_vllm_settings: dict[str, Any], tmp_path: Path
) -> None:
    proxy = start_proxy()  # no $/h given: --local's 0
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        await http.post("/v1/chat/completions", json=chat("new"))
        await http.post("/v1/chat/completions", json=chat("old"))
        with httpx.Client(base_url=proxy.url) as sync:
            wait_for_stored(sync, 2)
        proxy.stop()
    # an entry stored by an older proxy has no generation time
    for path in (tmp_path / "cache").glob("*.json"):
        document = orjson.loads(path.read_bytes())
        assert document["generation_seconds"] >= 0.2
        if document["preview"] == "old":
            del document["generation_seconds"]
            path.write_bytes(orjson.dumps(document))
    proxy = start_proxy()
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        old = await http.post("/v1/chat/completions", json=chat("old"))
        metrics = (await http.get("/metrics")).json()
        assert old.headers["x-cache"] == "HIT"
        tokens = old.json()["usage"]["completion_tokens"]
        assert metrics["windows"]["all_time"]["tokens_saved"] == tokens
        assert metrics["generation_seconds_saved"] == 0.0
        new = await http.post("/v1/chat/completions", json=chat("new"))
        metrics = (await http.get("/metrics")).json()
    assert new.headers["x-cache"] == "HIT"
    assert metrics["generation_seconds_saved"] >= 0.2
    assert metrics["usd_saved"] == 0.0 and metrics["cost_per_hour"] == 0.0


def test_prometheus_client_label_stays_bounded(tmp_path: Path) -> None:
    metrics = proxy_metrics.ProxyMetrics(ResponseCache(tmp_path, 10, 10**6))
    for n in range(300):  # every request from a client of its own
        client = family({"user-agent": f"tool-{n}/1.0"})
        metrics.record(model="m", status=200, cache="MISS", seconds=0.01, client=client)
    text = metrics.exposition(openmetrics=False)[0].decode()
    labels = {line.split('client="')[1].split('"')[0] for line in text.splitlines() if 'client="' in line}
    assert labels == {"other"} and set(FAMILIES) >= labels


@pytest.mark.parametrize("seconds", [2.5, None])
def test_a_large_hit_served_from_its_file_knows_its_generation_time(tmp_path: Path, seconds: float | None) -> None:
    """Entries past LARGE_BYTES are served a piece at a time from their file (StoredAnswer), not parsed: they carry
    the generation time too (none for an older entry)."""
    key, entry = big_entry("a large cached answer", events=4_000)
    entry.generation_seconds = seconds
    cache = ResponseCache(tmp_path / "cache", 10, 10**9)
    cache.load()
    cache.put(key, entry)
    assert (tmp_path / "cache" / f"{key}.json").stat().st_size > LARGE_BYTES
    answer = cache.get(key)
    assert isinstance(answer, StoredAnswer)
    try:
        assert answer.generation_seconds == seconds and answer.completion_tokens == 4_000
    finally:
        answer.close()
