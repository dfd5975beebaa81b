"""Coalescing: identical requests in flight at the same time share one upstream stream.

A ``Flight`` runs the upstream call in its own task, independent of any client. Every request with the
same cache key listens to it: streamed listeners get each chunk as it arrives (late joiners first get what
was sent so far), plain listeners get the assembled answer. A client leaving does not stop the flight
while others listen; when the last one leaves before the end, the upstream call is cancelled so the GPU
stops generating for nobody. A flight stays joinable until its answer is in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any, TypeGuard

import orjson

from llmpod.errors import UpstreamError
from llmpod.proxy._http import UpstreamConnectionError, UpstreamReadTimeout, UpstreamResponse
from llmpod.proxy.pieces import PIECE_BYTES
from llmpod.proxy.sse import DONE, Assembler, SSEParser, is_usage_only
from llmpod.proxy.upstream import Upstream
from llmpod.proxy.wire import error_body, normalise_error

log = logging.getLogger("llmpod.proxy.flights")

DRAIN_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0  # SSE comment sent to a waiting stream listener (Kilo's chunkTimeout)
DONE_EVENT = b"data: [DONE]\n\n"

StoreCallback = Callable[["Flight"], Awaitable[None]]


class Flight:
    """One upstream generation and everything it has produced so far."""

    def __init__(self, key: str, endpoint: str, path: str, body: dict[str, Any], kind: str | None = None) -> None:
        self.key = key
        self.model: str | None = None  # the model id its metrics count it under (a backend's, issue 18)
        self.kind = kind  # the server kind ``key`` names: the answer is stored only if that kind answers (None: any)
        self.endpoint = endpoint
        self.path = path
        self.body = body
        self.events: list[tuple[bytes, bool]] = []  # (SSE data payload, is it the usage-only chunk)
        self.assembler = Assembler(endpoint)
        self.error: UpstreamError | None = None
        self.done = False
        self.listeners = 0
        self.cancelled = False
        self.started_at = time.perf_counter()
        self.first_byte_at: float | None = None  # upstream answered with headers
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._loop = asyncio.get_running_loop()
        # Each waiting listener has a future of its own, resolved straight from here: the listener wakes one
        # loop turn later (asyncio.Event, wait_for and wait each add turns), and a listener that is cancelled
        # cancels only its own future, never one the others share.
        self._start_waiters: list[asyncio.Future[bool]] = []
        self._event_waiters: list[asyncio.Future[bool]] = []
        self._end_waiters: list[asyncio.Future[bool]] = []
        self.task: asyncio.Task[None] | None = None
        self.on_abandoned: Callable[[Flight], None] | None = None
        self.stored = True  # its answer goes to the cache when it completes
        self.foreign = False  # answered by another kind of server than ``kind``: never stored
        self._result: dict[str, Any] | None = None
        self._result_bytes: bytes | None = None

    # ----------------------------------------------------------------- producer
    async def run(self, upstream: Upstream, on_complete: StoreCallback) -> None:
        response: UpstreamResponse | None = None
        try:
            response = await upstream.open_stream(self.path, self.body)
            seen = upstream.observe(response.headers)  # a proxy that did not know the kind learns it here
            if self.kind is not None and seen != self.kind:
                # another kind of server took the address since the key was made: its answer is not that key's
                # (listeners still get it, as any miss gets the upstream's answer), so it is neither stored nor
                # joinable once finished
                self.foreign = True
                self.stored = False
            self.first_byte_at = time.perf_counter()
            self._start()
            await self._consume(response, upstream)
            self.finished_at = time.perf_counter()
            self._finish()
            # The listeners' answers go out before the cache write, which must not delay them: each woken
            # listener runs in the next loop turn, ahead of this task, and sends its answer without yielding.
            await asyncio.sleep(0)
            await _drain(response)  # what follows [DONE] (the chunked end) so the connection is reused
            if self.assembler.complete and not self.foreign:
                await on_complete(self)
        except UpstreamError as exc:
            self._fail(exc)
        except UpstreamConnectionError as exc:
            self._fail(self._cut(upstream, exc))
        except asyncio.CancelledError:
            self.cancelled = True
            self._fail(UpstreamError(499, error_body("every client left; generation cancelled", 499)))
            raise
        except Exception as exc:  # a bug must still end every listener's request cleanly
            log.exception("flight %s failed", self.key[:12])
            self._fail(UpstreamError(502, error_body(f"proxy error while streaming: {exc}", 502)))
        finally:
            if response is not None:
                if self.done and self.error is None:
                    response.release()
                else:
                    response.close()  # cut or cancelled: close the connection, so vLLM aborts the generation

    async def _consume(self, response: UpstreamResponse, upstream: Upstream) -> None:
        parser = SSEParser()
        while raw := await response.next_chunk():
            received = len(self.events)
            for data in parser.feed(raw):
                if data == DONE:
                    return  # the listeners hear of the last events with the end (_finish)
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError(
                        502, error_body(f"upstream {upstream.base} sent an invalid stream event", 502)
                    ) from None
                if not isinstance(chunk, dict):
                    raise UpstreamError(
                        502, error_body(f"upstream {upstream.base} sent a stream event that is not an object", 502)
                    )
                if chunk.get("error") or chunk.get("object") == "error":
                    body = _mid_stream_error(chunk)
                    raise UpstreamError(body["error"]["code"] if _is_status(body["error"]["code"]) else 500, body)
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.assembler.add(chunk)
                self.events.append((data, is_usage_only(chunk)))
            if len(self.events) > received:  # one wake-up per read, however many events it held
                self._notify()
        raise UpstreamError(502, error_body(f"upstream {upstream.base} closed the stream before it finished", 502))

    def _cut(self, upstream: Upstream, exc: BaseException) -> UpstreamError:
        if isinstance(exc, UpstreamReadTimeout):
            return upstream.unreachable(exc)
        return UpstreamError(
            502, error_body(f"upstream {upstream.base} closed the connection mid-stream ({type(exc).__name__})", 502)
        )

    def _start(self) -> None:
        self._start_waiters = _wake(self._start_waiters)

    def _finish(self) -> None:
        self.done = True
        self._start()
        self._end_waiters = _wake(self._end_waiters)
        self._notify()

    def _fail(self, error: UpstreamError) -> None:
        if self.done:
            return
        self.error = error
        self._finish()

    def _notify(self) -> None:
        self._event_waiters = _wake(self._event_waiters)

    def _waiter(self, waiters: list[asyncio.Future[bool]]) -> asyncio.Future[bool]:
        waiter: asyncio.Future[bool] = self._loop.create_future()
        waiters.append(waiter)
        return waiter

    # ----------------------------------------------------------------- listeners
    @property
    def is_started(self) -> bool:
        """The upstream has answered with its headers, or the flight has ended without them."""
        return self.first_byte_at is not None or self.done

    @property
    def succeeded(self) -> bool:
        return self.done and self.error is None

    def result(self) -> dict[str, Any]:
        """The assembled answer, built once however many listeners and the cache ask for it."""
        if self._result is None or not self.done:
            self._result = self.assembler.result()
        return self._result

    def result_bytes(self) -> bytes:
        """The finished answer's JSON, rendered once for every plain listener."""
        if self._result_bytes is None or not self.done:
            self._result_bytes = orjson.dumps(self.result())
        return self._result_bytes

    def replay(self, sent: int, include_usage: bool) -> tuple[bytes, int]:
        """The SSE bytes of the events from index ``sent`` on, about ``PIECE_BYTES`` at most, and where they end.

        A late joiner's backlog (or a slow client's) goes a piece at a time, each made only once the client took
        the one before: a client that stops reading holds one piece, not a copy of everything so far.
        """
        parts, size, events = [], 0, self.events
        while sent < len(events) and size < PIECE_BYTES:
            data, usage = events[sent]
            sent += 1
            if include_usage or not usage:
                parts.append(b"data: " + data + b"\n\n")
                size += len(data)
        return b"".join(parts), sent

    def ending(self) -> bytes:
        """What a finished stream ends with: [DONE], after the error as an event if it failed."""
        if self.error is None:
            return DONE_EVENT
        # the status line went out long ago: the error travels as an event, as vLLM does
        return b"data: " + orjson.dumps(self.error.body) + b"\n\n" + DONE_EVENT

    def whole(self, include_usage: bool) -> tuple[Iterator[bytes], int]:
        """A finished stream's SSE bytes in pieces (from the shared events, nothing joined), and their length."""
        ending = self.ending()
        length = len(ending) + sum(len(data) + 8 for data, usage in self.events if include_usage or not usage)

        def pieces() -> Iterator[bytes]:
            sent = 0
            while sent < len(self.events):
                piece, sent = self.replay(sent, include_usage)
                if piece:
                    yield piece
            yield ending

        return pieces(), length

    def attach(self) -> None:
        self.listeners += 1

    async def until_started(self) -> None:
        """Wait until the upstream has answered with its headers, or the flight has ended."""
        if not self.is_started:
            await self._waiter(self._start_waiters)

    def detach(self) -> None:
        """A listener left; with nobody left and the answer unfinished, stop generating."""
        self.listeners -= 1
        if self.listeners == 0 and not self.done and self.on_abandoned is not None:
            self.on_abandoned(self)

    async def stream(self, include_usage: bool) -> AsyncGenerator[bytes, None]:
        """The SSE bytes for one streamed listener (already attached), from the first chunk, live.

        Detaches when the client is done or gone.
        """
        sent = 0
        try:
            while True:
                if sent < len(self.events):
                    batch, sent = self.replay(sent, include_usage)
                    if batch:
                        yield batch
                    continue
                if self.done:
                    break
                waiter = self._waiter(self._event_waiters)
                timer = self._loop.call_later(KEEPALIVE_SECONDS, _settle, waiter, False)
                try:
                    woken = await waiter
                finally:
                    timer.cancel()
                if not woken:
                    with contextlib.suppress(ValueError):  # gone if an event came in the same loop turn
                        self._event_waiters.remove(waiter)
                    yield b": keep-alive\n\n"
            yield self.ending()
        finally:
            self.detach()

    async def wait(self, disconnected: Callable[[], Awaitable[Any]] | None) -> bool:
        """Wait (attached) for the whole answer; False if the client went away first (``disconnected()``
        returns when it does)."""
        self.attach()
        try:
            if self.done:
                return True
            waiter = self._waiter(self._end_waiters)
            if disconnected is None:
                return await waiter
            gone = asyncio.ensure_future(disconnected())
            gone.add_done_callback(lambda _: _settle(waiter, False))
            try:
                return await waiter
            finally:
                gone.cancel()
        finally:
            self.detach()


class FlightRegistry:
    """The flights now running; the joinable ones by cache key."""

    def __init__(self, on_finished: Callable[[Flight], None] | None = None) -> None:
        self._flights: dict[str, Flight] = {}
        self._running: set[Flight] = set()
        self._on_finished = on_finished

    def __len__(self) -> int:
        return len(self._running)

    def join(self, key: str) -> Flight | None:
        flight = self._flights.get(key)
        if flight is None or flight.cancelled or (flight.done and (flight.error is not None or not flight.stored)):
            return None  # a finished flight stands in for its cache entry only while that is being written
        return flight

    def launch(
        self,
        key: str,
        endpoint: str,
        path: str,
        body: dict[str, Any],
        upstream: Upstream,
        on_complete: StoreCallback,
        *,
        register: bool = True,
        stored: bool = True,
        kind: str | None = None,
    ) -> Flight:
        """Start the upstream call; ``register=False`` (Cache-Control: no-cache) makes it unjoinable, and
        ``stored=False`` (no-store) unjoinable once it has finished."""
        flight = Flight(key, endpoint, path, body, kind)
        flight.stored = stored
        flight.on_abandoned = self._abandon
        if register:
            self._flights[key] = flight
        self._running.add(flight)

        async def run() -> None:
            try:
                await flight.run(upstream, on_complete)
            finally:
                self._forget(flight)
                if self._on_finished is not None:
                    self._on_finished(flight)

        flight.task = asyncio.create_task(run(), name=f"flight-{key[:12]}")
        return flight

    def _forget(self, flight: Flight) -> None:
        self._running.discard(flight)
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def _abandon(self, flight: Flight) -> None:
        if flight.task is not None:
            flight.cancelled = True
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]  # a new identical request must not join a dying flight
            flight.task.cancel()

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop: cancel generations still running, but let finished ones complete their cache write."""
        storing = [f.task for f in self._running if f.task is not None and f.done]
        unfinished = [f.task for f in self._running if f.task is not None and not f.done]
        for task in unfinished:
            task.cancel()
        if storing:
            await asyncio.wait(storing, timeout=grace)
        for task in storing + unfinished:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._flights.clear()
        self._running.clear()


async def _drain(response: UpstreamResponse) -> None:
    if response.complete:  # the chunked end came with [DONE], as it nearly always does
        return
    with contextlib.suppress(UpstreamConnectionError, asyncio.TimeoutError):
        await asyncio.wait_for(response.read(), DRAIN_SECONDS)


def _wake(waiters: list[asyncio.Future[bool]]) -> list[asyncio.Future[bool]]:
    """Resolve every waiter (True: what they waited for happened); the fresh, empty list to wait on next."""
    for waiter in waiters:
        _settle(waiter, True)
    return []


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():  # it may have been cancelled (its listener left) or settled the other way
        waiter.set_result(value)


def _is_status(code: Any) -> TypeGuard[int]:
    return isinstance(code, int) and 400 <= code <= 599


def _mid_stream_error(chunk: dict[str, Any]) -> dict[str, Any]:
    """vLLM's in-stream error event (nested, or flat before v0.10.1) in the OpenAI shape."""
    inner = chunk.get("error")
    code = inner.get("code") if isinstance(inner, dict) else chunk.get("code")
    return normalise_error(code if _is_status(code) else 500, chunk)
