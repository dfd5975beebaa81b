"""The caching proxy's FastAPI app: ``create_app(settings)``.

The lifespan owns everything with a lifetime: the shared upstream ``httpx.AsyncClient``, the cache index,
the flights in progress and the request log. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmpod.proxy._http import HTTPPool
from llmpod.proxy._requestlog import RequestLog
from llmpod.proxy.cache import KEY_PATTERN, ResponseCache
from llmpod.proxy.flights import Flight, FlightRegistry
from llmpod.proxy.generation import GenerationHandler, preview
from llmpod.proxy.metrics import ProxyMetrics, wants_prometheus
from llmpod.proxy.settings import ProxySettings
from llmpod.proxy.upstream import Upstream, stream_pool
from llmpod.proxy.wire import (
    CHAT_REQUEST_SCHEMA,
    COMPLETION_REQUEST_SCHEMA,
    CacheEntrySummary,
    CacheListing,
    HealthReport,
    UpstreamHealth,
    error_response,
    json_response,
    request_body,
)

HEALTH_TTL = 2.0  # seconds an upstream probe is reused (the watchdog polls /health)
OPEN_PATHS = frozenset({"/health"})


class ProxyService:
    """Everything one running proxy holds."""

    def __init__(self, settings: ProxySettings, client: httpx.AsyncClient, pool: HTTPPool | None = None) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.cache = ResponseCache(settings.cache_dir, settings.max_cache_entries, settings.max_cache_bytes)
        self.metrics = ProxyMetrics(self.cache)
        self.upstream = Upstream(settings, client, pool)
        self.flights = FlightRegistry(on_finished=self._record_upstream)
        self.generation = GenerationHandler(self)
        self.request_log = RequestLog(settings.log_file)
        self._health: tuple[float, dict[str, Any]] | None = None

    async def store_answer(self, flight: Flight) -> None:
        body = flight.body
        chunks = [data.decode() for data, usage in flight.events if not usage]
        usage_chunks = [data.decode() for data, usage in flight.events if usage]
        request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        self.cache.put(flight.key, {
            "endpoint": flight.endpoint,
            "model": body.get("model"),
            "created": time.time(),
            "preview": preview(flight.endpoint, body),
            "completion_tokens": flight.assembler.completion_tokens,
            "request": request,
            "response": flight.result(),
            "chunks": chunks,
            "usage_chunk": usage_chunks[-1] if usage_chunks else None,
        })

    def _record_upstream(self, flight: Flight) -> None:
        self.upstream.learn(flight.body, flight.assembler.usage)
        if flight.cancelled:
            return
        end = flight.finished_at or time.perf_counter()
        ttft = None if flight.first_token_at is None else flight.first_token_at - flight.started_at
        self.metrics.record_upstream(seconds=end - flight.started_at, ttft=ttft,
                                     error_status=flight.error.status if flight.error else None)

    async def upstream_health(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_TTL:
            self._health = (now, await self.upstream.probe())
        return self._health[1]


GENERATION_ROUTES = {"/v1/chat/completions": ("chat.completions", "/chat/completions"),
                     "/v1/completions": ("completions", "/completions")}


class ProxyApp(FastAPI):
    """FastAPI, except that the two generation routes are answered before its middleware stack and router.

    Those layers (server errors, telemetry, body limit, routing, exception handlers) cost as much as a whole
    cache hit. The FastAPI routes stay declared for the OpenAPI schema; this path does the two jobs of the
    layers it skips that matter here: the proxy key, and a clean OpenAI-shaped 500 for a bug.
    """

    proxy_key: ProxyKey | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = GENERATION_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        if self.proxy_key is not None and not self.proxy_key.allows(scope):
            await self.proxy_key.denied(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        service: ProxyService = self.state.service
        try:
            await service.generation.serve(Request(scope, receive, send), *route, tracked_send)
        except Exception:
            logging.getLogger("llmpod.proxy").exception("error answering %s", scope["path"])
            if started:
                raise  # the status line is out: the server closes the connection, the client sees it cut
            await error_response("internal proxy error (logged)", 500)(scope, receive, send)


class ProxyKey:
    """With ``PROXY_API_KEY`` set, every route but /health needs it (Bearer, or the ``api-key`` header
    that Continue and Azure-style clients send). Compared in constant time."""

    def __init__(self, key: SecretStr) -> None:
        self._key = key.get_secret_value().encode()
        self.denied = error_response("missing or wrong API key for this proxy (PROXY_API_KEY)", 401,
                                     headers={"WWW-Authenticate": "Bearer"})

    def allows(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"api-key") or headers.get(b"x-api-key") or b""
        return hmac.compare_digest(token.strip(), self._key)


class ProxyKeyMiddleware:
    """Applies ``ProxyKey`` to the routes FastAPI answers."""

    def __init__(self, app: ASGIApp, key: ProxyKey) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.key.allows(scope):
            await self.app(scope, receive, send)
        else:
            await self.key.denied(scope, receive, send)


def _configure_logging(settings: ProxySettings) -> list[logging.Handler]:
    logger = logging.getLogger("llmpod")
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file is not None:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(settings.log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return handlers


def create_app(settings: ProxySettings) -> FastAPI:
    """The proxy app; its lifespan opens the upstream clients and the cache."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        handlers = _configure_logging(settings)
        timeout = httpx.Timeout(settings.upstream_timeout, connect=min(10.0, settings.upstream_timeout))
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        pool = stream_pool(settings)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            service = ProxyService(settings, client, pool)
            loading = service.cache.load_behind()
            service.cache.start_writer(asyncio.get_running_loop())
            app.state.service = service
            logging.getLogger("llmpod.proxy").info("proxy ready: upstream %s, cache %s", settings.upstream_base,
                                                   settings.cache_dir)
            try:
                yield
            finally:
                loading.cancel()
                await service.flights.aclose()
                await pool.aclose()
                await asyncio.to_thread(service.cache.stop_writer)  # every answer given is on disk
                service.request_log.close()
                logging.getLogger("llmpod.proxy").info("proxy stopped after %d requests",
                                                       service.metrics.requests_total)
        logger = logging.getLogger("llmpod")
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()

    # no OpenTelemetry here: FastAPI's native telemetry would otherwise look for providers on every request
    app = ProxyApp(title="llmpod caching proxy", version="0.1.0", lifespan=lifespan,
                   telemetry={"tracing": False, "metrics": False, "logs": False})

    def service_of(request: Request) -> ProxyService:
        return request.app.state.service  # type: ignore[no-any-return]

    if settings.proxy_api_key is not None:
        app.proxy_key = ProxyKey(settings.proxy_api_key)
        app.add_middleware(ProxyKeyMiddleware, key=app.proxy_key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "query")
        return error_response(f"invalid {where or 'request'}: {first.get('msg', 'bad value')}", 400, param=where)

    @app.post("/v1/chat/completions", openapi_extra=request_body(CHAT_REQUEST_SCHEMA))
    async def chat_completions(request: Request) -> Response:
        return service_of(request).generation.handle(request, "chat.completions", "/chat/completions")

    @app.post("/v1/completions", openapi_extra=request_body(COMPLETION_REQUEST_SCHEMA))
    async def completions(request: Request) -> Response:
        return service_of(request).generation.handle(request, "completions", "/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        upstream = service_of(request).upstream
        try:
            response = await upstream.client.get(f"{upstream.base}/models", headers=upstream.headers,
                                                 timeout=upstream.listing_timeout)
        except httpx.HTTPError as exc:
            error = upstream.unreachable(exc)
            return json_response(error.body, error.status)
        if response.status_code != 200:
            error = upstream.rejected(response.status_code, response.content, response.headers)
            return json_response(error.body, error.status, error.headers)
        return Response(response.content, media_type="application/json")

    @app.get("/health")
    async def health(request: Request) -> Response:
        service = service_of(request)
        upstream = UpstreamHealth(**await service.upstream_health())
        reason = None
        if not upstream.reachable or upstream.status_code != 200:
            reason = upstream.error or "upstream is not healthy"
        report = HealthReport(
            status="healthy" if reason is None else "degraded", reason=reason,
            endpoint=settings.upstream_url, cache_dir=str(settings.cache_dir),
            uptime=round(time.time() - service.started_at, 3), upstream=upstream,
            cache_loading=service.cache.loading,
        )
        return json_response(report.model_dump())

    @app.get("/metrics")
    async def metrics(request: Request, format: str | None = None) -> Response:
        service = service_of(request)
        prometheus, openmetrics = wants_prometheus(request.headers.get("accept", ""), format)
        if prometheus:
            content, media_type = service.metrics.exposition(openmetrics)
            return Response(content, media_type=media_type)
        return json_response(service.metrics.as_json(len(service.flights)))

    @app.get("/debug/cache")
    async def debug_cache(request: Request, offset: int = 0, limit: int = 50) -> Response:
        cache = service_of(request).cache
        ordered = cache.summaries()
        # past the end is the end: an offset of 2**70 would not even fit the JSON answer's integer
        offset, limit = min(max(0, offset), len(ordered)), min(max(1, limit), 500)
        entries = []
        for key, entry in ordered[offset:offset + limit]:
            document = cache.read_document(key) or {}
            entries.append(CacheEntrySummary(
                key=key, model=document.get("model"), endpoint=document.get("endpoint"),
                preview=str(document.get("preview") or ""), size=entry.size,
                created=document.get("created") or entry.created, hits=entry.hits,
                last_hit=entry.last_used if entry.hits else None))
        listing = CacheListing(total=len(ordered), offset=offset, limit=limit, entries=entries)
        return json_response(listing.model_dump())

    @app.get("/debug/cache/{key}")
    async def debug_cache_entry(request: Request, key: str) -> Response:
        cache = service_of(request).cache
        document = cache.read_document(key) if KEY_PATTERN.match(key) else None
        if document is None:
            return error_response(f"no cache entry with key {key[:80]!r}", 404)
        return Response(orjson.dumps(document), media_type="application/json")

    @app.delete("/debug/cache")
    async def clear_cache(request: Request) -> Response:
        return json_response({"deleted": service_of(request).cache.clear()})

    @app.delete("/debug/cache/{key}")
    async def delete_cache_entry(request: Request, key: str) -> Response:
        cache = service_of(request).cache
        if not (KEY_PATTERN.match(key) and cache.delete(key)):
            return error_response(f"no cache entry with key {key[:80]!r}", 404)
        return json_response({"deleted": 1})

    return app

