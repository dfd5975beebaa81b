"""The caching proxy's app: ``create_app(settings)``, the one place where it is assembled.

One route table: FastAPI's router holds every route, the two generation routes included, as plain ASGI apps
(generation.py) under ``Route(..., methods=["POST"])``. ``ProxyApp`` answers a POST to one of those paths
itself, in front of FastAPI's middleware stack, which costs as much as a whole cache hit; anything else on
those paths (a GET: 405, a trailing slash: redirect) goes through the router as usual. The API key
(auth.py) is checked once, before either.

The lifespan owns everything with a lifetime: the shared upstream ``httpx.AsyncClient``, the cache index,
the flights in progress and the request log. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from llmpod.proxy._requestlog import LogFileHandler
from llmpod.proxy.auth import ProxyKey
from llmpod.proxy.browser import HostGuard, json_only
from llmpod.proxy.generation import GenerationEndpoint, GenerationHandler
from llmpod.proxy.routes import add_routes
from llmpod.proxy.routing import MODEL_PREFIX, MODEL_ROUTES, SCOPE_MODEL, split_model_path
from llmpod.proxy.service import ProxyService
from llmpod.proxy.settings import ProxySettings
from llmpod.proxy.upstream import stream_pool
from llmpod.proxy.wire import CHAT_REQUEST_SCHEMA, COMPLETION_REQUEST_SCHEMA, error_response, request_body

# path -> (endpoint name in the cache key, upstream path, OpenAPI summary, request schema)
GENERATION_ROUTES = {
    "/v1/chat/completions": ("chat.completions", "/chat/completions", "Chat Completions", CHAT_REQUEST_SCHEMA),
    "/v1/completions": ("completions", "/completions", "Completions", COMPLETION_REQUEST_SCHEMA),
}
# the ``{id}`` of ``/llm/{id}/...``, documented as FastAPI documents the ``/llm/{model_id}/models`` GET routes
MODEL_ID_PARAMETER = {
    "name": "model_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "title": "Model Id"},
}


class ProxyApp(FastAPI):
    """FastAPI, with the API key checked first and the generation endpoints answered in front (module doc)."""

    proxy_key: ProxyKey | None = None
    host_guard: HostGuard | None = None
    routes_models = False  # several models (PROXY_BACKENDS): /llm/{id}/ paths are generation routes too

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._front: dict[str, GenerationEndpoint] = {}
        self._documented: dict[str, dict[str, Any]] = {}

    def add_generation_route(
        self, path: str, endpoint: GenerationEndpoint, summary: str, schema: dict[str, Any]
    ) -> None:
        """Put ``endpoint`` in the route table, answered in front for a POST, and in the OpenAPI schema."""
        self.router.routes.append(Route(path, endpoint, methods=["POST"]))
        self._front[path] = endpoint
        self._document(path, summary, schema)

    def document_model_routes(self) -> None:
        """Put the ``/llm/{id}/`` generation routes (several models) in the OpenAPI schema: ``__call__`` answers
        them by prefix, so no route in the table stands for them and FastAPI cannot see them."""
        for suffix, route in MODEL_ROUTES.items():
            plain = self._documented[route]["post"]
            self._document(
                f"{MODEL_PREFIX}{{model_id}}{suffix}",
                plain["summary"],
                plain["requestBody"]["content"]["application/json"]["schema"],
                description=f"`{route}` answered by model `model_id` whatever the body's `model` names; the body's "
                "`model` is rewritten to what that model's server serves.",
                parameters=[MODEL_ID_PARAMETER],
            )

    def _document(self, path: str, summary: str, schema: dict[str, Any], **extra: Any) -> None:
        # the operation id as FastAPI would make it: the summary, then the path with every non-word character as _
        operation_id = re.sub(r"\W", "_", f"{summary.lower().replace(' ', '_')}{path}_post")
        self._documented[path] = {
            "post": {
                "summary": summary,
                "operationId": operation_id,
                **extra,
                **request_body(schema),
                "responses": {
                    "200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
                },
            }
        }

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()  # FastAPI documents its own routes only; ASGI routes are added here
            schema["paths"] = {**self._documented, **schema.get("paths", {})}
            self.openapi_schema = schema
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # a rebound domain or a foreign page is refused before anything else, even /health (browser.py)
            if self.host_guard is not None and not await self.host_guard.check(scope, receive, send):
                return
            if self.proxy_key is not None and not self.proxy_key.allows(scope):
                await self.proxy_key.deny(scope, receive, send)
                return
            if scope["method"] == "POST":
                endpoint = self._front.get(scope["path"])
                routed = split_model_path(scope["path"]) if endpoint is None and self.routes_models else None
                if routed is not None:  # /llm/{id}/...: that model's generation route (routing.py)
                    scope[SCOPE_MODEL], route = routed
                    endpoint = self._front.get(route)
                if endpoint is not None:
                    if await json_only(scope, receive, send):
                        await endpoint(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def _configure_logging(settings: ProxySettings) -> list[logging.Handler]:
    logger = logging.getLogger("llmpod")
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file is not None:
        # opened as the request log is: never through a link, never another user's file (open_log)
        handlers.append(LogFileHandler(settings.log_file))
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
            if service.router is not None:
                service.router.start()
            app.state.service = service
            upstreams = ", ".join(f"{b.id} at {b.base_url}" for b in settings.backends) or settings.upstream_base
            logging.getLogger("llmpod.proxy").info("proxy ready: upstream %s, cache %s", upstreams, settings.cache_dir)
            try:
                yield
            finally:
                loading.cancel()
                await service.flights.aclose()
                await pool.aclose()
                if service.router is not None:
                    await service.router.aclose()
                await asyncio.to_thread(service.cache.stop_writer)  # every answer given is on disk
                service.request_log.close()
                logging.getLogger("llmpod.proxy").info(
                    "proxy stopped after %d requests", service.metrics.requests_total
                )
        logger = logging.getLogger("llmpod")
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()

    # no OpenTelemetry here: FastAPI's native telemetry would otherwise look for providers on every request
    app = ProxyApp(
        title="llmpod caching proxy",
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.host_guard = HostGuard(settings.host, settings.port, settings.allowed_hosts)
    if settings.proxy_api_key is not None:
        app.proxy_key = ProxyKey(settings.proxy_api_key)
    app.routes_models = bool(settings.backends)

    def handler() -> GenerationHandler:
        return app.state.service.generation  # type: ignore[no-any-return]

    for path, (endpoint, upstream_path, summary, schema) in GENERATION_ROUTES.items():
        app.add_generation_route(path, GenerationEndpoint(endpoint, upstream_path, handler), summary, schema)
    if app.routes_models:  # a single-model proxy does not answer them: they are not documented there
        app.document_model_routes()
    add_routes(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "query")
        return error_response(f"invalid {where or 'request'}: {first.get('msg', 'bad value')}", 400, param=where)

    return app
