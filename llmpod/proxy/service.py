"""``ProxyService``: everything one running proxy holds, made by the app's lifespan."""

from __future__ import annotations

import time
from typing import Any

import httpx

from llmpod.proxy._http import HTTPPool
from llmpod.proxy._requestlog import RequestLog
from llmpod.proxy.cache import ResponseCache
from llmpod.proxy.flights import Flight, FlightRegistry
from llmpod.proxy.generation import GenerationHandler, preview
from llmpod.proxy.metrics import ProxyMetrics
from llmpod.proxy.settings import ProxySettings
from llmpod.proxy.upstream import Upstream

HEALTH_TTL = 2.0  # seconds an upstream probe is reused (the watchdog polls /health)


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
        self.cache.put(
            flight.key,
            {
                "endpoint": flight.endpoint,
                "model": body.get("model"),
                "created": time.time(),
                "preview": preview(flight.endpoint, body),
                "completion_tokens": flight.assembler.completion_tokens,
                "request": request,
                "response": flight.result(),
                "chunks": chunks,
                "usage_chunk": usage_chunks[-1] if usage_chunks else None,
            },
        )

    def _record_upstream(self, flight: Flight) -> None:
        self.upstream.learn(flight.body, flight.assembler.usage)
        if flight.cancelled:
            return
        end = flight.finished_at or time.perf_counter()
        ttft = None if flight.first_token_at is None else flight.first_token_at - flight.started_at
        self.metrics.record_upstream(
            seconds=end - flight.started_at, ttft=ttft, error_status=flight.error.status if flight.error else None
        )

    async def upstream_health(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_TTL:
            self._health = (now, await self.upstream.probe())
        return self._health[1]
