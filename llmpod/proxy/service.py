"""``ProxyService``: everything one running proxy holds, made by the app's lifespan."""

from __future__ import annotations

import time
from typing import Any

import httpx

from llmpod.proxy._http import HTTPPool
from llmpod.proxy._requestlog import RequestLog
from llmpod.proxy.cache import ResponseCache
from llmpod.proxy.flights import Flight, FlightRegistry
from llmpod.proxy.generation import GenerationHandler
from llmpod.proxy.metrics import ProxyMetrics
from llmpod.proxy.model_metrics import ModelMetrics
from llmpod.proxy.routing import ModelRouter
from llmpod.proxy.settings import ProxySettings
from llmpod.proxy.upstream import Upstream

HEALTH_TTL = 2.0  # seconds an upstream probe is reused (the watchdog polls /health)


class ProxyService:
    """Everything one running proxy holds."""

    def __init__(self, settings: ProxySettings, client: httpx.AsyncClient, pool: HTTPPool | None = None) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.cache = ResponseCache(settings.cache_dir, settings.max_cache_entries, settings.max_cache_bytes)
        self.metrics = ProxyMetrics(self.cache, window=settings.hit_rate_window, cost_per_hour=settings.cost_per_hour)
        self.upstream = Upstream(settings, client, pool)
        # several models (issue 18): one upstream per backend; None keeps the single RUNPOD_ENDPOINT upstream
        self.router = ModelRouter(settings, client) if settings.backends else None
        if self.router is not None:
            self.metrics.per_model = ModelMetrics(self.metrics.registry, self.router)
        self.flights = FlightRegistry(on_finished=self._record_upstream)
        self.request_log = RequestLog(settings.log_file)
        self.generation = GenerationHandler(
            settings, self.cache, self.flights, self.upstream, self.metrics, self.request_log, self.router
        )
        self._health: tuple[float, dict[str, Any]] | None = None

    def _record_upstream(self, flight: Flight) -> None:
        slot = self.router.get(flight.model) if self.router is not None else None
        (slot.upstream if slot else self.upstream).learn(flight.body, flight.assembler.usage)
        if slot is not None and flight.error is not None and flight.error.status == 502:
            slot.health.failed(str(flight.error))  # unreachable or cut: 503 for the next requests, probed at once
        if flight.cancelled:
            self.metrics.record_cancelled(time.perf_counter() - flight.started_at)
            return
        end = flight.finished_at or time.perf_counter()
        ttft = None if flight.first_token_at is None else flight.first_token_at - flight.started_at
        self.metrics.record_upstream(
            model=flight.model or "-",
            seconds=end - flight.started_at,
            ttft=ttft,
            error_status=flight.error.status if flight.error else None,
        )

    async def upstream_health(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_TTL:
            self._health = (now, await self.upstream.probe())
        return self._health[1]
