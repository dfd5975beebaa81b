"""Streamed agents hang up mid-answer (Kilo's autocomplete cancels as the user types). A stream whose client leaves
while another listener stays on the same flight completes and is cached; when the last listener leaves, the upstream
call is cancelled and nothing partial is cached."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.proxy.test_app import chat, sse_events
from tests.support.helpers import MockControl
from tests.support.servers import LoopbackServer

# 100 chunks 0.05 s apart: 5 s for the whole answer, so the hang-ups below land mid-answer
LONG = {"first_token_delay": 0.0, "chunk_delay": 0.05, "chunk_count": 100}
pytestmark = pytest.mark.parametrize("mock_vllm_settings", [LONG])


async def until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not the case within {timeout}s")
        await asyncio.sleep(0.02)


async def read_events(stream: httpx.Response, count: int) -> str:
    """Read the stream until ``count`` data events have come; the text read."""
    text = ""
    pieces = stream.aiter_text()
    while text.count("data: ") < count:
        text += await pieces.__anext__()
    return text


async def test_a_stream_left_mid_answer_is_completed_and_cached_for_the_listener_who_stays(
    proxy: LoopbackServer, mock_control: MockControl, mock_vllm_settings: dict[str, Any]
) -> None:
    body = chat("complete this line", max_tokens=200, stream=True, stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        leaving = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        staying = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        assert (leaving.headers["x-cache"], staying.headers["x-cache"]) == ("MISS", "COALESCED")
        await read_events(leaving, 5)
        await leaving.aclose()  # the user typed on: this completion is not wanted any more
        stayed = await staying.aread()
        await staying.aclose()
        events = sse_events(stayed.decode())
        assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and "error" not in events[-2]
        assert events[-2]["usage"]["completion_tokens"] == 100
        await until(lambda: mock_control.stats()["in_flight"] == 0, "the upstream call ended")
        again = await http.post("/v1/chat/completions", json=body)
        metrics = (await http.get("/metrics")).json()
    assert again.headers["x-cache"] == "HIT"  # the whole answer was stored
    assert sse_events(again.text) == events
    assert mock_control.generations() == 1 and metrics["cache_entries"] == 1
    assert metrics["upstream_cancelled"] == 0


async def test_when_the_last_stream_leaves_the_upstream_call_is_cancelled_and_nothing_cached(
    proxy: LoopbackServer, mock_control: MockControl, mock_vllm_settings: dict[str, Any]
) -> None:
    body = chat("complete this other line", max_tokens=200, stream=True)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        first = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        second = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        await read_events(first, 3)
        await first.aclose()
        await read_events(second, 6)
        await until(lambda: mock_control.stats()["in_flight"] == 1, "the upstream call still runs for the second")
        left_at = time.monotonic()
        await second.aclose()  # the last listener leaves
        await until(lambda: mock_control.stats()["in_flight"] == 0, "the upstream call was cancelled", timeout=4.0)
        cancelled_in = time.monotonic() - left_at
        metrics = (await http.get("/metrics")).json()
        assert metrics["upstream_in_flight"] == 0 and metrics["cache_entries"] == 0
        # what it cost: the generation time until the cancel (6 events had come: at least 4 of them 0.05 s apart)
        assert metrics["upstream_cancelled"] == 1 and metrics["cancelled_generation_seconds"] >= 0.15
        assert cancelled_in < 4.0  # well before the 5 s answer would have ended on its own
        mock_control.configure(chunk_delay=0.0, chunk_count=5)
        again = await http.post("/v1/chat/completions", json=body)
    assert again.headers["x-cache"] == "MISS"  # nothing partial was stored, nor joined
    assert sse_events(again.text)[-1] == "[DONE]"
    assert mock_control.generations() == 2
