"""The proxy's FastAPI routes: /health, /metrics, /v1/models and /debug/cache.

The generation routes are not here: they are plain ASGI apps (generation.py) that ``ProxyApp`` answers in
front of FastAPI. Every handler finds the running ``ProxyService`` on ``app.state``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from llmpod.proxy.keys import KEY_PATTERN
from llmpod.proxy.metrics import wants_prometheus
from llmpod.proxy.wire import (
    CacheEntrySummary,
    CacheListing,
    HealthReport,
    UpstreamHealth,
    error_response,
    json_response,
)

if TYPE_CHECKING:
    from llmpod.proxy.routing import ModelRouter
    from llmpod.proxy.service import ProxyService


def service_of(request: Request) -> ProxyService:
    return request.app.state.service  # type: ignore[no-any-return]


def add_routes(app: FastAPI) -> None:
    """Declare the FastAPI routes on ``app`` (declared on the app itself: its route table stays flat)."""

    @app.get("/llm/{model_id:path}/models")
    @app.get("/llm/{model_id:path}/v1/models")  # declared first (decorators apply upwards): ``id`` never ends in /v1
    async def model_card(request: Request, model_id: str) -> Response:
        router = service_of(request).router
        slot = router.get(model_id) if router is not None else None
        if router is None or slot is None:
            return error_response(f"no model {model_id[:128]!r} behind this proxy", 404, param="model")
        return json_response(router.listing(slot))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if (router := service_of(request).router) is not None:
            return json_response(router.listing())  # every model, with its state: no single upstream to ask
        upstream = service_of(request).upstream
        try:
            response = await upstream.client.get(
                f"{upstream.base}/models", headers=upstream.headers, timeout=upstream.listing_timeout
            )
        except httpx.HTTPError as exc:
            error = upstream.unreachable(exc)
            return json_response(error.body, error.status)
        if response.status_code != 200:
            error = upstream.rejected(response.status_code, response.content, response.headers)
            return json_response(error.body, error.status, error.headers)
        upstream.observe(response.headers)  # a fresh word on what answers, as good as the model list's
        return Response(response.content, media_type="application/json")

    @app.get("/health")
    async def health(request: Request) -> Response:
        service = service_of(request)
        settings = service.settings
        if service.router is not None:
            return json_response(models_health(service, service.router))
        upstream = UpstreamHealth(**await service.upstream_health())
        reason = None
        if not upstream.reachable or upstream.status_code != 200:
            reason = upstream.error or "upstream is not healthy"
        report = HealthReport(
            status="healthy" if reason is None else "degraded",
            reason=reason,
            endpoint=settings.upstream_url,
            cache_dir=str(settings.cache_dir),
            uptime=round(time.time() - service.started_at, 3),
            upstream=upstream,
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
        for key, entry in ordered[offset : offset + limit]:
            document = cache.read_document(key) or {}
            entries.append(
                CacheEntrySummary(
                    key=key,
                    kind=document.get("kind") if isinstance(document.get("kind"), str) else None,
                    model=document.get("model"),
                    endpoint=document.get("endpoint"),
                    preview=str(document.get("preview") or ""),
                    size=entry.size,
                    created=document.get("created") or entry.created,
                    hits=entry.hits,
                    last_hit=entry.last_used if entry.hits else None,
                    key_rules=[str(name) for name in document.get("key_rules") or []],
                )
            )
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


def models_health(service: ProxyService, router: ModelRouter) -> dict[str, Any]:
    """/health with several models: each model's state; ``degraded`` (still HTTP 200, as with one upstream: the
    proxy itself is up and serves what it can) while any of them is not healthy."""
    models = {model_id: slot.health.current() for model_id, slot in router.slots.items()}
    ailing = sorted(model_id for model_id, health in models.items() if health.state != "healthy")
    return {
        "status": "degraded" if ailing else "healthy",
        "reason": f"not healthy: {', '.join(ailing)}" if ailing else None,
        "cache_dir": str(service.settings.cache_dir),
        "uptime": round(time.time() - service.started_at, 3),
        "cache_loading": service.cache.loading,
        "models": {
            model_id: {**health.as_json(), "url": router.slots[model_id].upstream.base}
            for model_id, health in models.items()
        },
    }
