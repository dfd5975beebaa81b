"""``POST /v1/chat/completions`` and ``POST /v1/completions``: cache, coalesce, forward.

Order of work for one request: read and check the body; take out the per-request cache controls; resolve
the model alias; key (the request as the client asked it, model resolved); then a hit is answered from disk, an
identical request in flight is joined, or ``max_tokens`` is fitted to the context and a new upstream stream starts.
Fitting comes after the key because on an older vLLM it depends on what the proxy has learned of the session (a
repeat must not get a new key, nor a /tokenize round trip before its hit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from llmpod.errors import UpstreamError
from llmpod.proxy._cache_stream import StoredAnswer, hit_response
from llmpod.proxy._requestlog import RequestLog, loggable
from llmpod.proxy.cache import CachedAnswer, CacheEntry, ResponseCache, UnkeyableRequest, cache_key
from llmpod.proxy.clients import OTHER, client_family
from llmpod.proxy.connections import reset_connection
from llmpod.proxy.drain import stopped_by_drain
from llmpod.proxy.flights import Flight, FlightRegistry
from llmpod.proxy.key_rules import KeyNormaliser
from llmpod.proxy.metrics import ProxyMetrics
from llmpod.proxy.pieces import SizedBody, sized
from llmpod.proxy.request_body import RequestProblem, cache_controls, preview, read_json_body
from llmpod.proxy.routing import SCOPE_MODEL, ModelRouter
from llmpod.proxy.settings import ProxySettings
from llmpod.proxy.upstream import Upstream
from llmpod.proxy.wire import error_body, error_response, json_response
from llmpod.sse_response import EventStream, SendDeadline
from llmpod.tool_calling import needs_tool_parser, refusal_message

log = logging.getLogger("llmpod.proxy")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Exchange:
    """One generation request as it moves through the proxy, for timing, metrics and the log line."""

    __slots__ = (
        "cache",
        "client",
        "endpoint",
        "key",
        "kind",
        "lookup_s",
        "model",
        "resolved",
        "rules",
        "saved_s",
        "started",
        "status",
        "tokens",
        "upstream_s",
    )

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.model = "-"
        self.resolved = False  # metrics label only served ids: clients' model names are unbounded
        self.key = ""
        self.kind = ""  # the server kind the key names (X-Cache-Kind)
        self.rules: tuple[str, ...] = ()  # the key rules that took something out of this request's key
        self.cache = "NONE"
        self.status = 200
        self.tokens = 0
        self.lookup_s = 0.0
        self.upstream_s: float | None = None
        self.client = OTHER  # the client's family, for the per-client hit rates
        self.saved_s = 0.0  # a hit: the seconds the answer's generation took, which it saved

    def headers(self, profiling: bool) -> dict[str, str]:
        headers = {"X-Cache": self.cache, "X-Cache-Key": self.key} if self.key else {}
        if self.kind:  # "unknown": no key, nothing looked up nor stored
            headers.update({"X-Cache": self.cache, "X-Cache-Kind": self.kind})
        if self.rules:
            headers["X-Cache-Rules"] = ",".join(self.rules)
        if profiling:
            timings = [f"cache;dur={self.lookup_s * 1000:.3f}"]
            if self.upstream_s is not None:
                timings.append(f"upstream;dur={self.upstream_s * 1000:.3f}")
            timings.append(f"total;dur={(time.perf_counter() - self.started) * 1000:.3f}")
            headers["Server-Timing"] = ", ".join(timings)
        return headers


class GenerationEndpoint:
    """One generation route (``POST /v1/chat/completions``, ``POST /v1/completions``) as a plain ASGI app.

    ``ProxyApp`` calls it in front of FastAPI's middleware and router: those layers (server errors, telemetry,
    body limit, routing, exception handlers) cost as much as a whole cache hit. So it does itself the one job
    of theirs that matters here: a clean OpenAI-shaped 500 for a bug. The API key is checked before it runs.
    """

    def __init__(self, endpoint: str, upstream_path: str, handler: Callable[[], GenerationHandler]) -> None:
        self.endpoint = endpoint  # ``chat.completions`` or ``completions``: names the answer in the cache key
        self.upstream_path = upstream_path
        self._handler = handler  # the running service's: it exists only once the app's lifespan started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._handler()
        # a client that stopped reading is cut: in flight forever, it would hold its flight and keep the pod billing
        deadline = SendDeadline(send, handler.settings.send_timeout)
        try:
            await handler.serve(Request(scope, receive, send), self.endpoint, self.upstream_path, deadline.send)
        except asyncio.CancelledError:
            if not deadline.settle():
                raise
            log.warning("%s: the client stopped reading for %ss: answer abandoned", scope["path"], deadline.timeout)
            # reset, not closed: a close waits for the client to read what is buffered, keeping its descriptor
            if reset_connection(scope):
                await asyncio.sleep(0)  # the server sees the connection lost before this returns: no error logged
        except Exception:
            log.exception("error answering %s", scope["path"])
            if deadline.started:
                raise  # the status line is out: the server closes the connection, the client sees it cut
            await error_response("internal proxy error (logged)", 500)(scope, receive, send)
        finally:
            deadline.close()


class GenerationHandler:
    """Answers the two generation routes with the collaborators of one running proxy (``ProxyService``)."""

    def __init__(
        self,
        settings: ProxySettings,
        cache: ResponseCache,
        flights: FlightRegistry,
        upstream: Upstream,
        metrics: ProxyMetrics,
        request_log: RequestLog,
        router: ModelRouter | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.flights = flights
        self.upstream = upstream
        self.metrics = metrics
        self.request_log = request_log
        self.router = router  # several models (issue 18): the backend each request goes to; None: one upstream
        self.key_rules = KeyNormaliser.from_settings(settings)

    async def serve(self, request: Request, endpoint: str, path: str, send: Send) -> None:
        """Answer the request, then count and log it: the client is not kept waiting for the log line."""
        exchange = Exchange(endpoint)
        exchange.client = client_family(request.scope["headers"])
        self.metrics.in_flight += 1
        streaming = False
        try:
            response, streaming = await self._answer(request, exchange, path)
            await response(request.scope, request.receive, send)
        except BaseException:
            exchange.status = _undelivered(request) if exchange.status < 300 else exchange.status  # not activity
            raise
        finally:
            if not streaming:  # a stream is logged when it ends (_observe)
                self._done(request, exchange)

    async def _answer(self, request: Request, exchange: Exchange, path: str) -> tuple[Response, bool]:
        settings, upstream = self.settings, self.upstream
        endpoint = exchange.endpoint
        try:
            body, body_bytes = await read_json_body(request, settings.max_body_bytes)
            no_cache, no_store = cache_controls(request, body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool) and stream is not None:
                raise RequestProblem(400, "'stream' must be a boolean", "stream")
            options = body.get("stream_options")
            include_usage = bool(stream) and isinstance(options, dict) and options.get("include_usage") is True
            if settings.upstream_tool_calling is False and endpoint == "chat.completions" and needs_tool_parser(body):
                # before the cache and the flights, so never stored or joined; vLLM's own 400 names server flags
                model = str(body.get("model") or "the served model")
                raise RequestProblem(400, refusal_message(model, settings.tool_capable_models), "tools")
            if isinstance(body.get("model"), str):
                exchange.model = body["model"]
            slot = None if self.router is None else self.router.pick(body.get("model"), request.scope.get(SCOPE_MODEL))
            refused = None if slot is None else slot.health.refusal()  # then only a hit or a flight can answer
            if slot is not None:  # its server's name for the model is forwarded; its id names it everywhere else
                upstream, body["model"] = slot.upstream, slot.backend.upstream_model
            served = None if refused else await upstream.resolve(body.get("model"))
            if served is not None:
                body["model"] = exchange.model = served.id
                exchange.resolved = True
            if slot is not None:
                exchange.model, exchange.resolved = slot.backend.id, True
                self.metrics.model_began(exchange.model)
            lookup_start = time.perf_counter()
            exchange.kind = (kind := upstream.kind) or "unknown"  # unknown: a bypass (llmpod/server_kind.py)
            # ``body`` is forwarded as sent; the key names the backend's id, never its server's name for the model
            keyed, exchange.rules = self.key_rules.normalise(
                endpoint, {**body, "model": exchange.model} if slot else body
            )
            exchange.key = key = cache_key(endpoint, keyed, kind) if kind else ""
            no_cache, no_store = (no_cache, no_store) if kind else (True, True)
        except UnkeyableRequest as exc:
            return self._error(exchange, 400, error_body(str(exc), 400)), False
        except RequestProblem as problem:
            return self._error(
                exchange, problem.status, error_body(str(problem), problem.status, param=problem.param)
            ), False
        except UpstreamError as exc:
            return self._error(exchange, exc.status, exc.body, exc.headers), False

        answer, flight = (None, None) if no_cache else self._lookup(key)
        exchange.lookup_s = time.perf_counter() - lookup_start
        if answer is None and flight is None:
            # never raises (what cannot be fitted goes as is). On an older vLLM it may ask /tokenize: an identical
            # request may have launched, or even finished, meanwhile; join it or take its answer, not generate twice
            body = await upstream.fit_context(body, served, body_bytes)
            answer, flight = (None, None) if no_cache else self._lookup(key)
        if answer is not None:
            return self._hit(exchange, answer, bool(stream), include_usage), False
        if flight is not None:
            # a finished flight whose answer is still being written to disk is as good as a hit
            exchange.cache = "HIT" if flight.succeeded else "COALESCED"
            exchange.saved_s = _generation_seconds(flight) or 0.0
        elif refused is not None:
            return self._error(exchange, refused.status, refused.body, refused.headers), False  # a hit still served
        else:
            exchange.cache = "BYPASS" if no_cache else "MISS"
            forwarded = {**body, "stream": True, "stream_options": {"include_usage": True}}
            flight = self.flights.launch(
                key,
                endpoint,
                path,
                forwarded,
                upstream,
                on_complete=self._store if not no_store else _skip_store,
                register=not no_cache,
                stored=not no_store,
                kind=kind,
            )
            flight.model = exchange.model if exchange.resolved else None
        if stream:
            return await self._stream(request, exchange, flight, include_usage)
        return await self._wait(request, exchange, flight), False

    def _lookup(self, key: str) -> tuple[CachedAnswer | StoredAnswer | None, Flight | None]:
        """The cached answer for ``key``, else the flight generating it, else neither."""
        answer = self.cache.get(key)
        return (answer, None) if answer is not None else (None, self.flights.join(key))

    async def _store(self, flight: Flight) -> None:
        """Cache a finished flight's answer: the stream's chunks as sent, and the assembled response."""
        body = flight.body
        chunks = [data.decode() for data, usage in flight.events if not usage]
        usage_chunks = [data.decode() for data, usage in flight.events if usage]
        self.cache.put(
            flight.key,
            CacheEntry(
                endpoint=flight.endpoint,
                model=body.get("model"),
                created=time.time(),
                preview=preview(flight.endpoint, body),
                completion_tokens=flight.assembler.completion_tokens,
                request={k: v for k, v in body.items() if k not in ("stream", "stream_options")},
                response=flight.result(),
                chunks=chunks,
                usage_chunk=usage_chunks[-1] if usage_chunks else None,
                kind=flight.kind,
                key_rules=list(self.key_rules.normalise(flight.endpoint, body)[1]),  # as when it was keyed
                generation_seconds=_generation_seconds(flight),
            ),
        )

    def _hit(
        self, exchange: Exchange, answer: CachedAnswer | StoredAnswer, stream: bool, include_usage: bool
    ) -> Response:
        exchange.cache = "HIT"
        exchange.tokens = answer.completion_tokens
        exchange.saved_s = answer.generation_seconds or 0.0  # an entry stored before this was recorded: tokens only
        headers = exchange.headers(self.settings.enable_profiling)
        return hit_response(answer, stream, include_usage, {**SSE_HEADERS, **headers} if stream else headers)

    async def _wait(
        self, request: Request, exchange: Exchange, flight: Flight, sse: bool = False, include_usage: bool = False
    ) -> Response:
        """The whole answer once the flight has ended; with ``sse``, an HTTP/1.0 stream (it knows no chunked
        encoding), sent with its length in pieces of the flight's events: never joined for each client."""
        present = await flight.wait(lambda: _disconnected(request))
        exchange.upstream_s = _upstream_time(flight, exchange)
        if not present:
            exchange.status = 499  # nginx's "client closed request": nobody reads this response
            return Response(status_code=499)
        if flight.error is not None and not (sse and flight.events):
            return self._error(exchange, flight.error.status, flight.error.body, flight.error.headers)
        exchange.tokens = flight.assembler.completion_tokens
        headers = exchange.headers(self.settings.enable_profiling)
        if sse:
            exchange.status = exchange.status if flight.error is None else flight.error.status
            return SizedBody(
                *flight.whole(include_usage), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
            )
        # rendered once for every listener; a large one goes in pieces (a stalled client holds one, not a copy)
        return sized(flight.result_bytes(), media_type="application/json", headers=headers)

    async def _stream(
        self, request: Request, exchange: Exchange, flight: Flight, include_usage: bool
    ) -> tuple[Response, bool]:
        if request.scope.get("http_version") == "1.0":
            return await self._wait(request, exchange, flight, True, include_usage), False
        flight.attach()
        try:
            await flight.until_started()
        except BaseException:
            flight.detach()
            raise
        exchange.upstream_s = _upstream_time(flight, exchange)
        if flight.error is not None and not flight.events:
            flight.detach()
            return self._error(exchange, flight.error.status, flight.error.body, flight.error.headers), False
        headers = {**SSE_HEADERS, **exchange.headers(self.settings.enable_profiling)}
        body = self._observe(request, exchange, flight, flight.stream(include_usage))
        return EventStream(body, headers=headers), True

    async def _observe(
        self, request: Request, exchange: Exchange, flight: Flight, chunks: AsyncGenerator[bytes, None]
    ) -> AsyncGenerator[bytes, None]:
        try:
            async with contextlib.aclosing(chunks):  # closed with us: the flight hears at once that we left
                async for chunk in chunks:
                    yield chunk
            if flight.error is not None:
                exchange.status = flight.error.status
            exchange.tokens = flight.assembler.completion_tokens
        except BaseException:
            exchange.status = _undelivered(request)
            raise
        finally:
            self._done(request, exchange)

    def _error(
        self, exchange: Exchange, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Response:
        exchange.status = status
        return json_response(body, status, {**(headers or {}), **exchange.headers(self.settings.enable_profiling)})

    def _done(self, request: Request, exchange: Exchange) -> None:
        seconds = time.perf_counter() - exchange.started
        self.metrics.in_flight -= 1
        hit = exchange.cache == "HIT"
        self.metrics.record(
            model=exchange.model if exchange.resolved else "-",
            status=exchange.status,
            cache=exchange.cache,
            seconds=seconds,
            cached_tokens=exchange.tokens if hit else 0,
            client=exchange.client,
            saved_seconds=exchange.saved_s if hit else 0.0,
        )
        upstream = "" if exchange.upstream_s is None else f" upstream_ms={exchange.upstream_s * 1000:.1f}"
        self.request_log.write(
            f"{request.method} {request.scope['path']} model={loggable(exchange.model)} status={exchange.status} "
            f"cache={exchange.cache} latency_ms={seconds * 1000:.2f} lookup_ms={exchange.lookup_s * 1000:.3f}"
            f"{upstream} tokens={exchange.tokens}"
        )


async def _skip_store(flight: Flight) -> None:
    return None


def _undelivered(request: Request) -> int:
    """The status logged for an answer cut short: 503 when the proxy's drain ended it as it stopped, else 499."""
    return 503 if stopped_by_drain(request.scope) else 499


def _generation_seconds(flight: Flight) -> float | None:
    """How long the upstream took for the whole answer: what each later hit on it saves."""
    return None if flight.finished_at is None else round(flight.finished_at - flight.started_at, 6)


def _upstream_time(flight: Flight, exchange: Exchange) -> float | None:
    """Time this request waited for the upstream's first byte (a follower waits less or not at all)."""
    if flight.first_byte_at is None:
        return None
    return max(0.0, flight.first_byte_at - max(flight.started_at, exchange.started))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away. The body is already read, so the next message is the end."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
