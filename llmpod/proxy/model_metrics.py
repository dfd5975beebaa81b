"""What the proxy counts per model when several models sit behind it (issue 18).

The request counter (``llm_proxy_requests{model,status,cache}``), the duration histogram and the upstream errors
(``llm_proxy_upstream_errors{model,status}``) carry a ``model`` label in ``ProxyMetrics`` itself; here are the
backends' gauges (up or not, state, restarts from the supervisor's state file) and the per-model totals of JSON
``/metrics``' ``models`` object. The label only ever holds configured ids (a request naming an unknown model counts
under ``-``), so its values never grow with what clients send.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, get_args

from prometheus_client import CollectorRegistry, Gauge

from llmpod.backends import Lifecycle
from llmpod.proxy.metrics import percentiles

if TYPE_CHECKING:
    from llmpod.proxy.routing import ModelRouter

RESERVOIR = 1024


class _ModelCounts:
    __slots__ = (
        "by_cache",
        "by_status",
        "in_flight",
        "last_request_at",
        "latency",
        "requests",
        "upstream_calls",
        "upstream_errors",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.by_cache: dict[str, int] = {}
        self.upstream_calls = 0
        self.upstream_errors = 0
        self.latency: deque[float] = deque(maxlen=RESERVOIR)
        # the idleness clock of this model alone (a RunPod pod among several models is stopped when idle): as the
        # proxy's own, only a 2xx moves it, and a request in flight is activity
        self.in_flight = 0
        self.last_request_at: float | None = None


class ModelMetrics:
    """Per-model counts and gauges, registered in the proxy's own registry."""

    def __init__(self, registry: CollectorRegistry, router: ModelRouter) -> None:
        self.router = router
        self._counts = {model_id: _ModelCounts() for model_id in router.ids}
        up = Gauge(
            "llm_proxy_backend_up", "1 while the model's server is healthy, else 0", ["model"], registry=registry
        )
        state = Gauge(
            "llm_proxy_backend_state",
            "1 for the model's current state, 0 for the others",
            ["model", "state"],
            registry=registry,
        )
        restarts = Gauge(
            "llm_proxy_backend_restarts",
            "Restarts of the model's server in its restart window (the supervisor's count)",
            ["model"],
            registry=registry,
        )
        for model_id, slot in router.slots.items():
            health = slot.health
            up.labels(model_id).set_function(lambda h=health: float(h.current().state == "healthy"))  # type: ignore[misc]
            restarts.labels(model_id).set_function(lambda h=health: float(h.current().restarts))  # type: ignore[misc]
            for name in get_args(Lifecycle):
                state.labels(model_id, name).set_function(
                    lambda h=health, n=name: float(h.current().state == n)  # type: ignore[misc]
                )

    def began(self, model: str) -> None:
        """A request was routed to ``model``; its ``record`` ends it."""
        counts = self._counts.get(model)
        if counts is not None:
            counts.in_flight += 1

    def record(self, model: str, status: int, cache: str, seconds: float) -> None:
        counts = self._counts.get(model)
        if counts is None:  # not routed to a model (an unknown name, a bad body): only the totals count it
            return
        counts.in_flight = max(0, counts.in_flight - 1)  # routed to this model: ``began`` counted it
        if 200 <= status < 300:
            counts.last_request_at = time.time()
        counts.requests += 1
        status_key = str(status)
        counts.by_status[status_key] = counts.by_status.get(status_key, 0) + 1
        counts.by_cache[cache] = counts.by_cache.get(cache, 0) + 1
        counts.latency.append(seconds)

    def record_upstream(self, model: str, error_status: int | None) -> None:
        counts = self._counts.get(model)
        if counts is None:
            return
        counts.upstream_calls += 1
        if error_status is not None:
            counts.upstream_errors += 1

    def as_json(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for model_id, slot in self.router.slots.items():
            counts = self._counts[model_id]
            hits, misses = counts.by_cache.get("HIT", 0), counts.by_cache.get("MISS", 0)
            lookups = hits + misses + counts.by_cache.get("COALESCED", 0)
            models[model_id] = {
                **slot.health.current().as_json(),
                "url": slot.upstream.base,
                "requests": counts.requests,
                "requests_by_status": dict(counts.by_status),
                "requests_by_cache": dict(counts.by_cache),
                "errors": sum(n for status, n in counts.by_status.items() if int(status) >= 400),
                "cache_hit_rate": round(hits / lookups, 4) if lookups else 0.0,
                "upstream_calls": counts.upstream_calls,
                "upstream_errors": counts.upstream_errors,
                "latency_ms": percentiles(counts.latency),
                "in_flight": counts.in_flight,
                "last_request_at": counts.last_request_at,
            }
        return models
