"""Which flights a new identical request may join: running ones, and finished ones only until their answer
is in the cache (a no-store answer is never stored, so it is never served to a later request)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmpod.proxy.flights import Flight, FlightRegistry

EVENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},'
    b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)


class OneEventResponse:
    """An upstream answer: one chunk and [DONE], after ``go`` is set."""

    def __init__(self, go: asyncio.Event) -> None:
        self.go = go
        self.sent = False
        self.complete = False
        self.headers: dict[str, str] = {}

    async def next_chunk(self) -> bytes:
        await self.go.wait()
        if self.sent:
            return b""
        self.sent = self.complete = True
        return EVENT

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class StubUpstream:
    base = "http://stub/v1"

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def open_stream(self, path: str, body: dict[str, Any]) -> OneEventResponse:
        return OneEventResponse(self.go)

    def observe(self, headers: Any) -> str | None:
        return None  # flights made without a kind store whatever answers


@pytest.mark.parametrize("stored", [True, False])
async def test_a_finished_flight_is_joinable_only_while_its_answer_is_being_stored(stored: bool) -> None:
    registry = FlightRegistry()
    upstream = StubUpstream()
    storing = asyncio.Event()
    release_store = asyncio.Event()

    async def store(flight: Flight) -> None:
        storing.set()
        await release_store.wait()

    flight = registry.launch(
        "k",
        "chat.completions",
        "/chat/completions",
        {},
        upstream,  # type: ignore[arg-type]
        store,
        stored=stored,
    )
    assert registry.join("k") is flight  # running: always joinable
    upstream.go.set()
    assert await asyncio.wait_for(flight.wait(None), 5)
    assert flight.succeeded
    if stored:
        await asyncio.wait_for(storing.wait(), 5)
    assert (registry.join("k") is flight) is stored
    release_store.set()
    assert flight.task is not None
    await asyncio.wait_for(flight.task, 5)
    assert registry.join("k") is None  # forgotten once it ended: the cache answers from now on


class HeldUpstream(StubUpstream):
    """An upstream whose status line and headers wait for ``answer`` (a cold pod behind RunPod's proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()

    async def open_stream(self, path: str, body: dict[str, Any]) -> OneEventResponse:
        await self.answer.wait()
        return OneEventResponse(self.go)


async def test_a_streamed_client_leaving_before_the_upstream_answers_does_not_fail_the_others() -> None:
    registry = FlightRegistry()
    upstream = HeldUpstream()
    flight = registry.launch(
        "k",
        "chat.completions",
        "/chat/completions",
        {},
        upstream,  # type: ignore[arg-type]
        _no_store,
    )

    async def listen() -> bytes:
        flight.attach()
        await flight.until_started()
        return b"".join([chunk async for chunk in flight.stream(include_usage=False)])

    leaving, staying = asyncio.create_task(listen()), asyncio.create_task(listen())
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.sleep(0.01)
    upstream.answer.set()
    upstream.go.set()
    answer = await asyncio.wait_for(staying, 5)
    assert b'"content":"hi"' in answer and answer.endswith(b"data: [DONE]\n\n")
    assert flight.succeeded and not flight.cancelled


async def test_a_plain_listener_has_its_answer_before_the_cache_write_starts() -> None:
    registry = FlightRegistry()
    upstream = StubUpstream()
    answered: list[dict[str, Any]] = []
    seen_at_store: list[int] = []

    async def store(flight: Flight) -> None:
        seen_at_store.append(len(answered))

    flight = registry.launch(
        "k",
        "chat.completions",
        "/chat/completions",
        {},
        upstream,  # type: ignore[arg-type]
        store,
    )

    async def listen() -> None:
        if await flight.wait(None):
            answered.append(flight.result())  # the handler builds and sends the response in this same step

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.01)
    upstream.go.set()
    await asyncio.wait_for(listener, 5)
    assert flight.task is not None
    await asyncio.wait_for(flight.task, 5)
    assert seen_at_store == [1]


async def _no_store(flight: Flight) -> None:
    return None
