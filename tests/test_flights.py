"""Which flights a new identical request may join: running ones, and finished ones only until their answer
is in the cache (a no-store answer is never stored, so it is never served to a later request)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmpod.flights import Flight, FlightRegistry

EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},' \
        b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


class OneEventResponse:
    """An upstream answer: one chunk and [DONE], after ``go`` is set."""

    def __init__(self, go: asyncio.Event) -> None:
        self.go = go
        self.sent = False
        self.complete = False

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


@pytest.mark.parametrize("stored", [True, False])
async def test_a_finished_flight_is_joinable_only_while_its_answer_is_being_stored(stored: bool) -> None:
    registry = FlightRegistry()
    upstream = StubUpstream()
    storing = asyncio.Event()
    release_store = asyncio.Event()

    async def store(flight: Flight) -> None:
        storing.set()
        await release_store.wait()

    flight = registry.launch("k", "chat.completions", "/chat/completions", {}, upstream,  # type: ignore[arg-type]
                             store, stored=stored)
    assert registry.join("k") is flight  # running: always joinable
    upstream.go.set()
    await asyncio.wait_for(flight.finished, 5)
    assert flight.succeeded
    if stored:
        await asyncio.wait_for(storing.wait(), 5)
    assert (registry.join("k") is flight) is stored
    release_store.set()
    assert flight.task is not None
    await asyncio.wait_for(flight.task, 5)
    assert registry.join("k") is None  # forgotten once it ended: the cache answers from now on
