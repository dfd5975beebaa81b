"""The proxy over real loopback sockets, in front of the mock vLLM server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.helpers import (
    SERVED_MODEL,
    SHORT_MODEL,
    HeldScan,
    MockControl,
    ProxyFactory,
    wait_for_stored,
    wait_until,
)
from tests.support.servers import LoopbackServer, free_port


def chat(content: str = "Write a hello world function in Python", **extra: Any) -> dict[str, Any]:
    return {"model": SHORT_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 50, **extra}


def sse_events(text: str) -> list[Any]:
    """The data payloads of an SSE body, JSON-decoded except the final [DONE]."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e.get("choices")
    )


# ----------------------------------------------------------------------------------------------- caching
def test_repeat_request_is_served_from_cache_without_reaching_vllm(
    client: httpx.Client, mock_control: MockControl
) -> None:
    first = client.post("/v1/chat/completions", json=chat())
    second = client.post("/v1/chat/completions", json=chat())
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.headers["x-cache-key"] == second.headers["x-cache-key"]
    assert first.json() == second.json()  # same id too: the answer is replayed, not regenerated
    answer = first.json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == SERVED_MODEL
    assert answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert mock_control.generations() == 1


def test_streamed_miss_then_hit_replays_the_same_chunks(client: httpx.Client, mock_control: MockControl) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    assert first.headers["content-type"].startswith("text/event-stream")
    assert second.headers["content-type"].startswith("text/event-stream")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    events = sse_events(first.text)
    assert sse_events(second.text) == events
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert events[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    assert mock_control.generations() == 1


def test_streamed_and_plain_requests_share_one_entry(client: httpx.Client, mock_control: MockControl) -> None:
    streamed = client.post("/v1/chat/completions", json=chat(stream=True))
    plain = client.post("/v1/chat/completions", json=chat())
    streamed_again = client.post("/v1/chat/completions", json=chat(stream=True))
    assert [r.headers["x-cache"] for r in (streamed, plain, streamed_again)] == ["MISS", "HIT", "HIT"]
    assert plain.json()["choices"][0]["message"]["content"] == streamed_text(sse_events(streamed.text))
    assert mock_control.generations() == 1


def test_usage_chunk_only_when_the_client_asks(client: httpx.Client) -> None:
    without = sse_events(client.post("/v1/chat/completions", json=chat(stream=True)).text)
    with_usage = sse_events(
        client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})).text
    )
    assert not any(e != "[DONE]" and e["choices"] == [] for e in without)
    assert with_usage[-2]["choices"] == [] and "usage" in with_usage[-2]
    assert with_usage[:-2] == without[:-1]  # otherwise the very same replayed chunks


def test_different_questions_are_different_entries(client: httpx.Client, mock_control: MockControl) -> None:
    a = client.post("/v1/chat/completions", json=chat("def factorial"))
    b = client.post("/v1/chat/completions", json=chat("def fibonacci"))
    c = client.post("/v1/chat/completions", json=chat("def factorial", temperature=0.7))
    assert {r.headers["x-cache"] for r in (a, b, c)} == {"MISS"}
    assert len({r.headers["x-cache-key"] for r in (a, b, c)}) == 3
    assert mock_control.generations() == 3


def test_fields_that_do_not_change_the_answer_share_the_entry(client: httpx.Client) -> None:
    first = client.post(
        "/v1/chat/completions", json=chat(user="alice"), headers={"X-Session-Id": "one", "Authorization": "Bearer a"}
    )
    reordered = {"max_tokens": 50, "messages": chat()["messages"], "model": SERVED_MODEL, "user": "bob"}
    second = client.post(
        "/v1/chat/completions",
        content=json.dumps(reordered),
        headers={"X-Session-Id": "two", "Content-Type": "application/json"},
    )
    assert second.headers["x-cache"] == "HIT"
    assert second.headers["x-cache-key"] == first.headers["x-cache-key"]


def test_completions_endpoint_stream_and_plain(client: httpx.Client, mock_control: MockControl) -> None:
    body = {"model": SHORT_MODEL, "prompt": "def hello():", "max_tokens": 16}
    plain = client.post("/v1/completions", json=body)
    streamed = client.post("/v1/completions", json={**body, "stream": True})
    assert plain.status_code == 200 and plain.headers["x-cache"] == "MISS"
    assert plain.json()["object"] == "text_completion"
    assert streamed.headers["x-cache"] == "HIT"
    text = "".join(e["choices"][0]["text"] for e in sse_events(streamed.text) if e != "[DONE]" and e["choices"])
    assert text == plain.json()["choices"][0]["text"]
    chat_twin = client.post("/v1/chat/completions", json=chat("def hello():", max_tokens=16))
    assert chat_twin.headers["x-cache"] == "MISS"  # the endpoint is part of the key
    assert mock_control.generations() == 2


@pytest.mark.parametrize("mock_vllm_settings", [{"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}])
def test_tool_calls_pass_through_in_both_modes(client: httpx.Client, mock_vllm_settings: dict[str, Any]) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "description": "Read a file",
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
            },
        }
    ]
    body = chat("Please call read_file on main.py", tools=tools, tool_choice="auto")
    streamed = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    plain = client.post("/v1/chat/completions", json=body).json()
    call = plain["choices"][0]["message"]["tool_calls"][0]
    assert plain["choices"][0]["finish_reason"] == "tool_calls"
    assert call["function"]["name"] == "read_file"
    deltas = [
        d for e in streamed if e != "[DONE]" and e["choices"] for d in e["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert deltas[0]["id"] == call["id"] and deltas[0]["function"]["name"] == "read_file"
    assert "".join(d["function"].get("arguments") or "" for d in deltas) == call["function"]["arguments"]
    assert "path" in json.loads(call["function"]["arguments"])


@pytest.mark.parametrize("mock_vllm_settings", [{"reasoning": True}, {"reasoning": True, "wire_format": "legacy"}])
def test_reasoning_deltas_pass_through(client: httpx.Client, mock_vllm_settings: dict[str, Any]) -> None:
    field = "reasoning_content" if mock_vllm_settings.get("wire_format") == "legacy" else "reasoning"
    streamed = sse_events(client.post("/v1/chat/completions", json=chat(stream=True)).text)
    reasoning = "".join(e["choices"][0]["delta"].get(field) or "" for e in streamed if e != "[DONE]" and e["choices"])
    assert reasoning
    plain = client.post("/v1/chat/completions", json=chat())
    assert plain.headers["x-cache"] == "HIT"
    assert plain.json()["choices"][0]["message"][field] == reasoning
    replayed = sse_events(client.post("/v1/chat/completions", json=chat(stream=True)).text)
    assert replayed == streamed


# ----------------------------------------------------------------------------------------- cache controls
def test_cache_control_no_cache_skips_lookup_but_stores(client: httpx.Client, mock_control: MockControl) -> None:
    client.post("/v1/chat/completions", json=chat())
    fresh = client.post("/v1/chat/completions", json=chat(), headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "BYPASS"
    assert mock_control.generations() == 2
    key = fresh.headers["x-cache-key"]
    wait_until(
        lambda: client.get(f"/debug/cache/{key}").json()["response"]["id"] == fresh.json()["id"],
        "the fresh answer replaced the stored one",
    )
    assert client.post("/v1/chat/completions", json=chat()).json() == fresh.json()


def test_cache_control_no_store_does_not_store(client: httpx.Client, mock_control: MockControl) -> None:
    client.post("/v1/chat/completions", json=chat(), headers={"Cache-Control": "no-store"})
    again = client.post("/v1/chat/completions", json=chat())
    assert again.headers["x-cache"] == "MISS"
    assert mock_control.generations() == 2


def test_litellm_body_cache_field_controls_and_is_stripped(client: httpx.Client, mock_control: MockControl) -> None:
    stored = client.post("/v1/chat/completions", json=chat(cache={"no-store": False}))
    bypass = client.post("/v1/chat/completions", json=chat(cache={"no-cache": True, "no-store": True}))
    assert (stored.headers["x-cache"], bypass.headers["x-cache"]) == ("MISS", "BYPASS")
    assert stored.headers["x-cache-key"] == bypass.headers["x-cache-key"]
    wait_for_stored(client, 1)
    entry = client.get(f"/debug/cache/{stored.headers['x-cache-key']}").json()
    assert "cache" not in entry["request"]
    assert mock_control.generations() == 2


# ------------------------------------------------------------------------------------------- models
def test_models_lists_upstream_ids(client: httpx.Client) -> None:
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [SERVED_MODEL]


@pytest.mark.parametrize("name", [SERVED_MODEL, SERVED_MODEL.upper(), "deepseek-coder-33B-instruct-AWQ", SHORT_MODEL])
def test_model_aliases_are_rewritten_to_the_served_id(client: httpx.Client, name: str) -> None:
    response = client.post("/v1/chat/completions", json={**chat(), "model": name})
    assert response.status_code == 200
    assert response.json()["model"] == SERVED_MODEL


def test_unknown_model_gets_vllm_404_listing_served_ids(client: httpx.Client, mock_control: MockControl) -> None:
    response = client.post("/v1/chat/completions", json={**chat(), "model": "gpt-4o"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "NotFoundError" and error["param"] == "model"
    assert SERVED_MODEL in error["message"]
    assert mock_control.generations() == 0


@pytest.mark.parametrize("mock_vllm_settings", [{"max_model_len": 512}])
def test_kilo_code_default_max_tokens_is_fitted_to_the_context(
    client: httpx.Client, mock_vllm_settings: dict[str, Any]
) -> None:
    response = client.post("/v1/chat/completions", json=chat(max_tokens=32000))
    assert response.status_code == 200, response.text
    wait_for_stored(client, 1)
    entry = client.get(f"/debug/cache/{response.headers['x-cache-key']}").json()
    # the key describes what was forwarded: capped at the context (a vLLM >= 0.32 lowers the rest itself), or to
    # what the prompt leaves (an older one)
    assert 0 < entry["request"]["max_tokens"] <= 512
    assert client.post("/v1/chat/completions", json=chat(max_tokens=32000)).headers["x-cache"] == "HIT"


# ---------------------------------------------------------------------------------- health, metrics, debug
def test_health_is_healthy_with_a_live_upstream(client: httpx.Client, mock_vllm: LoopbackServer) -> None:
    report = client.get("/health").json()
    assert report["status"] == "healthy"
    assert report["endpoint"].startswith(mock_vllm.url)
    assert report["upstream"]["reachable"] is True
    assert report["upstream"]["models"] == [SERVED_MODEL]
    assert report["uptime"] >= 0
    assert "cache_dir" in report


def test_health_is_degraded_but_200_when_upstream_is_down(start_proxy: ProxyFactory) -> None:
    proxy = start_proxy(upstream_url=f"http://127.0.0.1:{free_port()}/v1")
    response = httpx.get(f"{proxy.url}/health", timeout=10)
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "degraded"
    assert report["upstream"]["reachable"] is False
    assert "unreachable" in report["reason"]


def test_metrics_json_counts_hits_misses_and_tokens(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/v1/chat/completions", json=chat())
    wait_for_stored(client, 1)
    metrics = client.get("/metrics").json()
    assert metrics["requests_total"] == 3
    assert (metrics["cache_hits"], metrics["cache_misses"]) == (2, 1)
    assert metrics["cache_hit_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert metrics["cache_entries"] == 1 and metrics["cache_bytes"] > 0
    assert metrics["upstream_calls"] == 1 and metrics["upstream_errors"] == 0
    assert metrics["hit_latency_ms"]["count"] == 2 and metrics["hit_latency_ms"]["p50"] is not None
    assert metrics["time_to_first_token_ms"]["count"] == 1
    assert metrics["tokens_served_from_cache"] > 0
    assert metrics["last_request_at"] is not None
    for field in ("cache_evictions", "coalesced_requests", "in_flight", "upstream_latency_ms"):
        assert field in metrics


def test_metrics_prometheus_when_prometheus_asks(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json=chat())
    wait_for_stored(client, 1)
    client.post("/v1/chat/completions", json=chat())
    scrape = client.get(
        "/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"},
    )
    assert scrape.headers["content-type"].startswith("application/openmetrics-text")
    text = client.get("/metrics?format=prometheus").text
    assert f'llm_proxy_requests_total{{cache="HIT",model="{SERVED_MODEL}",status="200"}} 1.0' in text
    assert "llm_proxy_request_duration_seconds_bucket" in text
    assert "llm_proxy_cache_entries 1.0" in text
    assert client.get("/metrics", headers={"Accept": "text/plain"}).text.startswith("# HELP")


def test_debug_cache_lists_shows_and_deletes_entries(client: httpx.Client) -> None:
    keys = [client.post("/v1/chat/completions", json=chat(f"question {i}")).headers["x-cache-key"] for i in range(3)]
    wait_for_stored(client, 3)
    client.post("/v1/chat/completions", json=chat("question 0"))  # a hit on the oldest
    listing = client.get("/debug/cache", params={"limit": 2}).json()
    assert listing["total"] == 3 and len(listing["entries"]) == 2
    assert listing["entries"][0]["key"] == keys[2]  # newest first
    rest = client.get("/debug/cache", params={"offset": 2, "limit": 2}).json()["entries"]
    oldest = rest[0]
    assert oldest["key"] == keys[0]
    assert oldest["hits"] == 1 and oldest["last_hit"] is not None
    assert oldest["model"] == SERVED_MODEL and oldest["preview"] == "question 0" and oldest["size"] > 0
    whole = client.get(f"/debug/cache/{keys[1]}").json()
    assert whole["response"]["choices"][0]["message"]["content"]
    assert whole["request"]["messages"][0]["content"] == "question 1"
    assert client.delete(f"/debug/cache/{keys[1]}").json() == {"deleted": 1}
    assert client.get(f"/debug/cache/{keys[1]}").status_code == 404
    assert client.delete("/debug/cache").json() == {"deleted": 2}
    assert client.get("/debug/cache").json()["total"] == 0


@pytest.mark.parametrize("key", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "a" * 63, "A" * 64, "%00"])
def test_debug_cache_refuses_paths_outside_the_cache(client: httpx.Client, tmp_path: Path, key: str) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    assert client.get(f"/debug/cache/{key}").status_code == 404
    assert client.delete(f"/debug/cache/{key}").status_code == 404
    assert outside.exists()


def test_profiling_adds_server_timing(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy = start_proxy(enable_profiling=True)
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        miss = http.post("/v1/chat/completions", json=chat())
        hit = http.post("/v1/chat/completions", json=chat())
    assert {"cache", "upstream", "total"} <= {
        part.split(";")[0].strip() for part in miss.headers["server-timing"].split(",")
    }
    assert hit.headers["server-timing"].startswith("cache;dur=")
    log = (tmp_path / "proxy.log").read_text()
    assert "cache=MISS" in log and "upstream_ms=" in log and "cache=HIT" in log


def test_one_log_line_per_request(client: httpx.Client, tmp_path: Path) -> None:
    client.post("/v1/chat/completions", json=chat())
    client.post("/v1/chat/completions", json=chat())
    client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    lines = [line for line in (tmp_path / "proxy.log").read_text().splitlines() if "POST /v1/" in line]
    assert len(lines) == 3
    assert f"model={SERVED_MODEL} status=200 cache=MISS" in lines[0]
    assert "status=200 cache=HIT" in lines[1] and "tokens=" in lines[1] and "latency_ms=" in lines[1]
    assert "status=400" in lines[2]


# ------------------------------------------------------------------------------------------- restarts
def test_cache_survives_a_proxy_restart(start_proxy: ProxyFactory, mock_control: MockControl, tmp_path: Path) -> None:
    first = start_proxy()
    answer = httpx.post(f"{first.url}/v1/chat/completions", json=chat(), timeout=20).json()
    first.stop()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1  # `ls CACHE_DIR` shows the entry
    second = start_proxy()
    again = httpx.post(f"{second.url}/v1/chat/completions", json=chat(), timeout=20)
    assert again.headers["x-cache"] == "HIT"
    assert again.json() == answer
    assert mock_control.generations() == 1


def test_a_restarted_proxy_serves_its_cache_while_the_index_loads(
    start_proxy: ProxyFactory, mock_control: MockControl, held_scan: HeldScan
) -> None:
    held_scan.armed = False
    first = start_proxy()
    answers = [httpx.post(f"{first.url}/v1/chat/completions", json=chat(f"q{i}"), timeout=20).json() for i in range(3)]
    first.stop()
    held_scan.armed = True
    second = start_proxy()  # ready while the scan of the cache directory is held
    with httpx.Client(base_url=second.url, timeout=20) as http:
        assert http.get("/health").json()["cache_loading"] is True
        again = http.post("/v1/chat/completions", json=chat("q1"))
        assert (again.headers["x-cache"], again.json()) == ("HIT", answers[1])
        held_scan.release()
        wait_until(lambda: http.get("/health").json()["cache_loading"] is False, "the index loaded")
        assert http.get("/metrics").json()["cache_entries"] == 3
        assert [http.post("/v1/chat/completions", json=chat(f"q{i}")).headers["x-cache"] for i in (0, 2)] == [
            "HIT",
            "HIT",
        ]
    assert mock_control.generations() == 3


def test_corrupt_entry_is_a_miss_and_is_replaced(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    first = start_proxy()
    key = httpx.post(f"{first.url}/v1/chat/completions", json=chat(), timeout=20).headers["x-cache-key"]
    first.stop()
    (tmp_path / "cache" / f"{key}.json").write_bytes(b'{"format": 1, "key": "' + key.encode() + b'", "respo')
    second = start_proxy()
    with httpx.Client(base_url=second.url, timeout=20) as http:
        again = http.post("/v1/chat/completions", json=chat())
        assert again.status_code == 200 and again.headers["x-cache"] == "MISS"
        assert http.get("/metrics").json()["cache_corrupt_discarded"] == 1
        assert http.post("/v1/chat/completions", json=chat()).headers["x-cache"] == "HIT"


def test_eviction_by_count_through_the_proxy(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy = start_proxy(max_cache_entries=2)
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        for i in range(3):
            http.post("/v1/chat/completions", json=chat(f"q{i}"))
            wait_for_stored(http, min(i + 1, 2))
        wait_until(lambda: http.get("/metrics").json()["cache_evictions"] == 1, "the oldest answer evicted")
        metrics = http.get("/metrics").json()
        assert (metrics["cache_entries"], metrics["cache_evictions"]) == (2, 1)
        assert http.post("/v1/chat/completions", json=chat("q0")).headers["x-cache"] == "MISS"
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
