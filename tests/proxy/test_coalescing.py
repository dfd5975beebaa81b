"""Identical requests in flight together make one upstream call, and every client gets the whole answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.proxy.test_app import chat, sse_events
from tests.support.helpers import MockControl
from tests.support.servers import LoopbackServer

# The mock takes its time, so that requests really overlap (not a timing assertion: see the counts).
SLOW = {"first_token_delay": 0.5, "chunk_delay": 0.02, "chunk_count": 12}
pytestmark = pytest.mark.parametrize("mock_vllm_settings", [SLOW])


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_concurrent_identical_plain_requests_make_one_upstream_call(
    proxy: LoopbackServer, mock_control: MockControl, mock_vllm_settings: dict[str, Any]
) -> None:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=chat()) for _ in range(10)))
        metrics = (await http.get("/metrics")).json()
    assert all(r.status_code == 200 for r in responses)
    assert len({r.text for r in responses}) == 1  # everyone got the same, complete answer
    assert responses[0].json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert sorted(r.headers["x-cache"] for r in responses) == ["COALESCED"] * 9 + ["MISS"]
    assert mock_control.generations() == 1
    assert metrics["coalesced_requests"] == 9 and metrics["upstream_calls"] == 1


async def test_streamed_followers_receive_every_chunk(
    proxy: LoopbackServer, mock_control: MockControl, mock_vllm_settings: dict[str, Any]
) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        streamed = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(5)))
        plain = await asyncio.gather(*(http.post("/v1/chat/completions", json=chat()) for _ in range(2)))
    event_lists = [sse_events(r.text) for r in streamed]
    assert all(events == event_lists[0] for events in event_lists)
    assert event_lists[0][-1] == "[DONE]" and event_lists[0][-2]["choices"] == []
    assert all(r.headers["x-cache"] == "HIT" for r in plain)
    assert mock_control.generations() == 1


async def test_late_joiner_gets_what_was_sent_so_far_then_follows(
    proxy: LoopbackServer, mock_control: MockControl, mock_vllm_settings: dict[str, Any]
) -> None:
    mock_control.configure(first_token_delay=0.0, chunk_delay=0.1, chunk_count=15)
    body = chat(stream=True)
    async with (
        httpx.AsyncClient(base_url=proxy.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as leader,
    ):
        pieces = leader.aiter_text()
        leader_text = ""
        while leader_text.count("data: ") < 4:
            leader_text += await pieces.__anext__()
        late = await http.post("/v1/chat/completions", json=body)
        async for piece in pieces:
            leader_text += piece
    assert late.headers["x-cache"] == "COALESCED"
    assert sse_events(late.text) == sse_events(leader_text)
    assert mock_control.generations() == 1


async def test_leader_leaving_does_not_stop_the_others(
    proxy: LoopbackServer, mock_control: MockControl, mock_vllm_settings: dict[str, Any]
) -> None:
    mock_control.configure(first_token_delay=0.0, chunk_delay=0.1, chunk_count=15)
    body = chat(stream=True)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        leader = await http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        follower = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        await wait_until(lambda: mock_control.stats()["in_flight"] == 1)
        await asyncio.sleep(0.1)  # let the follower join (it is counted as coalesced below)
        await leader.aclose()  # the client that started it goes away
        answer = await follower
        assert answer.status_code == 200
        events = sse_events(answer.text)
        assert events[-1] == "[DONE]" and "error" not in events[-2]
        assert answer.headers["x-cache"] == "COALESCED"
        again = await http.post("/v1/chat/completions", json=chat())
        assert again.headers["x-cache"] == "HIT"  # the answer was completed and stored
    assert mock_control.generations() == 1


async def test_upstream_call_is_cancelled_when_every_client_leaves(
    proxy: LoopbackServer, mock_control: MockControl, mock_vllm_settings: dict[str, Any]
) -> None:
    mock_control.configure(first_token_delay=0.0, chunk_delay=0.2, chunk_count=100)  # 20 s if not cancelled
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as stream:
            async for _ in stream.aiter_bytes():
                break
        await wait_until(lambda: mock_control.stats()["in_flight"] == 0)
        metrics = (await http.get("/metrics")).json()
        assert metrics["upstream_in_flight"] == 0 and metrics["cache_entries"] == 0
        # a plain client that gives up (timeout) cancels too
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=chat("another"), timeout=0.5)
        await wait_until(lambda: mock_control.stats()["in_flight"] == 0)
        # the same question again starts a fresh upstream call instead of joining the cancelled one
        mock_control.configure(chunk_delay=0.0, chunk_count=5)
        again = await http.post("/v1/chat/completions", json=chat("another"))
    assert again.status_code == 200 and again.headers["x-cache"] == "MISS"
    assert again.json()["choices"][0]["message"]["content"]
    assert mock_control.generations() == 3
