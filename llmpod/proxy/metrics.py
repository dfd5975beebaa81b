"""What the proxy counts, exposed as JSON (``curl /metrics | jq``) and as Prometheus text.

Each app has its own ``CollectorRegistry`` so several proxies can live in one process (tests). Latency
percentiles for the JSON view come from bounded reservoirs of the most recent samples.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from llmpod.proxy.clients import OTHER
from llmpod.proxy.hitrates import CacheWindows

if TYPE_CHECKING:
    from llmpod.proxy.cache import ResponseCache

RESERVOIR = 2048
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def percentiles(samples: deque[float]) -> dict[str, float | int | None]:
    """p50/p90/p99 in milliseconds of the recent samples (seconds)."""
    if not samples:
        return {"count": 0, "p50": None, "p90": None, "p99": None}
    ordered = sorted(samples)
    last = len(ordered) - 1

    def at(q: float) -> float:
        return round(ordered[min(last, int(q * len(ordered)))] * 1000, 3)

    return {"count": len(ordered), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


class PerModel(Protocol):
    """The per-model counts (model_metrics.py), which ``record`` and ``record_upstream`` feed too."""

    def began(self, model: str) -> None: ...
    def record(self, model: str, status: int, cache: str, seconds: float) -> None: ...
    def record_upstream(self, model: str, error_status: int | None) -> None: ...
    def as_json(self) -> dict[str, Any]: ...


class ProxyMetrics:
    def __init__(self, cache: ResponseCache, *, window: int = 100, cost_per_hour: float = 0.0) -> None:
        self.cache = cache
        self.windows = CacheWindows(window, cost_per_hour)  # hit rates and savings: recent, last hour, per client
        self.started_at = time.time()
        self.requests_total = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_bypass = 0
        self.coalesced = 0
        self.upstream_errors = 0
        self.upstream_calls = 0
        self.upstream_cancelled = 0  # every listener left mid-answer: generated for nobody, nothing cached
        self.cancelled_seconds = 0.0
        self.tokens_from_cache = 0
        self.in_flight = 0
        # the watchdog's idleness clock (``last_request_at`` in /metrics): only successful generation work moves
        # it, so a page posting malformed requests every few seconds, or /health polls, do not keep a pod billing
        self.last_request_at: float | None = None
        self.hit_latency: deque[float] = deque(maxlen=RESERVOIR)
        self.upstream_latency: deque[float] = deque(maxlen=RESERVOIR)
        self.ttft: deque[float] = deque(maxlen=RESERVOIR)

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("llm_proxy_requests", "Requests answered", ["model", "status", "cache"], registry=r)
        self._duration = Histogram(
            "llm_proxy_request_duration_seconds",
            "Time to answer a request",
            ["model", "cache"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._ttft = Histogram(
            "llm_proxy_upstream_time_to_first_token_seconds",
            "Upstream time to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._upstream_errors = Counter(
            "llm_proxy_upstream_errors", "Upstream calls that failed", ["model", "status"], registry=r
        )
        self._cached_tokens = Counter(
            "llm_proxy_cache_served_tokens", "Completion tokens served from cache", registry=r
        )
        self._cancelled = Counter(
            "llm_proxy_upstream_cancelled", "Upstream calls cancelled because every client left", registry=r
        )
        self._coalesced = Counter("llm_proxy_coalesced_requests", "Requests that joined an in-flight call", registry=r)
        # per client family (clients.FAMILIES, a fixed set: the label never grows with what clients send)
        self._client_requests = Counter(
            "llm_proxy_client_requests", "Requests by client family and cache outcome", ["client", "cache"], registry=r
        )
        self._client_tokens = Counter(
            "llm_proxy_client_cache_served_tokens", "Completion tokens served from cache", ["client"], registry=r
        )
        self._client_seconds = Counter(
            "llm_proxy_client_generation_seconds_saved",
            "Upstream generation seconds the cache's hits saved",
            ["client"],
            registry=r,
        )
        self._client_usd = Counter(
            "llm_proxy_client_usd_saved",
            "Pod dollars the cache's hits saved (seconds saved times $/h)",
            ["client"],
            registry=r,
        )
        hit_ratio = Gauge(
            "llm_proxy_cache_hit_ratio", "Cache hit rate of lookups over a window", ["window"], registry=r
        )
        for window_name in ("all_time", "recent", "last_hour"):
            hit_ratio.labels(window_name).set_function(
                lambda w=window_name: self.windows.rate(w, time.time())  # type: ignore[misc]
            )
        self._client_children: dict[tuple[str, str], Any] = {}
        self._client_savings: dict[str, tuple[Any, Any, Any]] = {}
        self._request_children: dict[tuple[str, int, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self.per_model: PerModel | None = None  # several models behind the proxy (issue 18): set by the service
        gauges = {
            "llm_proxy_in_flight_requests": ("Requests being answered", lambda: self.in_flight),
            "llm_proxy_cache_entries": ("Answers in the cache", lambda: len(cache)),
            "llm_proxy_cache_bytes": ("Bytes of answers in the cache", lambda: cache.total_bytes),
            "llm_proxy_cache_evictions": ("Entries evicted since start", lambda: cache.evictions),
            "llm_proxy_cache_corrupt_discarded": ("Corrupt entries deleted", lambda: cache.corrupt_discarded),
            "llm_proxy_cache_foreign_skipped": (
                "Entries not served: another user's file, or not a regular file",
                lambda: cache.foreign_skipped,
            ),
            "llm_proxy_uptime_seconds": ("Seconds since the proxy started", lambda: time.time() - self.started_at),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)

    # ----------------------------------------------------------------- recording
    def record(
        self,
        *,
        model: str,
        status: int,
        cache: str,
        seconds: float,
        cached_tokens: int = 0,
        client: str = OTHER,
        saved_seconds: float = 0.0,
    ) -> None:
        """One answered request. ``cache`` is HIT, MISS, BYPASS, COALESCED or NONE (rejected early); ``client``
        its client family; for a hit, ``cached_tokens`` and ``saved_seconds`` are what it saved (the entry's
        completion tokens and the seconds its generation took).

        Only a 2xx (a stream that delivered to its end) counts as activity for idle shutdown.
        """
        now = time.time()
        self.requests_total += 1
        if 200 <= status < 300:
            self.last_request_at = now
        self.windows.record(now, client, cache, cached_tokens, saved_seconds)
        self._record_client(client, cache, cached_tokens, saved_seconds)
        if cache == "HIT":
            self.cache_hits += 1
            self.hit_latency.append(seconds)
            self.tokens_from_cache += cached_tokens
            self._cached_tokens.inc(cached_tokens)
        elif cache == "MISS":
            self.cache_misses += 1
        elif cache == "BYPASS":
            self.cache_bypass += 1
        elif cache == "COALESCED":
            self.coalesced += 1
            self._coalesced.inc()
        # label children are looked up once: labels() takes a lock and builds a key on every call
        child = self._request_children.get((model, status, cache))
        if child is None:
            child = self._request_children[(model, status, cache)] = self._requests.labels(model, str(status), cache)
        child.inc()
        duration = self._duration_children.get((model, cache))
        if duration is None:
            duration = self._duration_children[(model, cache)] = self._duration.labels(model, cache)
        duration.observe(seconds)
        if self.per_model is not None:
            self.per_model.record(model, status, cache, seconds)

    def model_began(self, model: str) -> None:
        if self.per_model is not None:
            self.per_model.began(model)

    def _record_client(self, client: str, cache: str, tokens: int, seconds: float) -> None:
        child = self._client_children.get((client, cache))
        if child is None:
            child = self._client_children[(client, cache)] = self._client_requests.labels(client, cache)
        child.inc()
        if cache == "HIT":
            savings = self._client_savings.get(client)
            if savings is None:
                savings = self._client_savings[client] = (
                    self._client_tokens.labels(client),
                    self._client_seconds.labels(client),
                    self._client_usd.labels(client),
                )
            savings[0].inc(tokens)
            if seconds:
                savings[1].inc(seconds)
                savings[2].inc(seconds * self.windows.cost_per_hour / 3600)

    def record_cancelled(self, seconds: float) -> None:
        """An upstream call cancelled after ``seconds`` because every listener left: what that cost."""
        self.upstream_cancelled += 1
        self.cancelled_seconds += seconds
        self._cancelled.inc()

    def record_upstream(
        self, *, seconds: float, ttft: float | None, error_status: int | None, model: str = "-"
    ) -> None:
        """One upstream generation call, however many clients it served; ``model`` a served or configured id."""
        self.upstream_calls += 1
        if self.per_model is not None:
            self.per_model.record_upstream(model, error_status)
        if error_status is not None:
            self.upstream_errors += 1
            self._upstream_errors.labels(model, str(error_status)).inc()
            return
        self.upstream_latency.append(seconds)
        if ttft is not None:
            self.ttft.append(ttft)
            self._ttft.observe(ttft)

    # ----------------------------------------------------------------- views
    def as_json(self, in_flight_upstream: int) -> dict[str, Any]:
        lookups = self.cache_hits + self.cache_misses + self.coalesced
        cache = self.cache
        windows, clients = self.windows.as_json(time.time())
        return {
            "requests_total": self.requests_total,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_bypass": self.cache_bypass,
            "cache_hit_rate": round(self.cache_hits / lookups, 4) if lookups else 0.0,
            "cache_entries": len(cache),
            "cache_bytes": cache.total_bytes,
            "cache_max_entries": cache.max_entries,
            "cache_max_bytes": cache.max_bytes,
            "cache_evictions": cache.evictions,
            "cache_corrupt_discarded": cache.corrupt_discarded,
            "cache_foreign_skipped": cache.foreign_skipped,
            "cache_store_errors": cache.store_errors,
            "cache_storing": cache.store_disabled_reason is None,
            "cache_store_problem": cache.store_disabled_reason,
            "coalesced_requests": self.coalesced,
            "upstream_calls": self.upstream_calls,
            "upstream_errors": self.upstream_errors,
            "upstream_in_flight": in_flight_upstream,
            "upstream_cancelled": self.upstream_cancelled,
            "cancelled_generation_seconds": round(self.cancelled_seconds, 3),
            "in_flight": self.in_flight,
            "hit_latency_ms": percentiles(self.hit_latency),
            "upstream_latency_ms": percentiles(self.upstream_latency),
            "time_to_first_token_ms": percentiles(self.ttft),
            "tokens_served_from_cache": self.tokens_from_cache,
            "generation_seconds_saved": windows["all_time"]["generation_seconds_saved"],
            "usd_saved": windows["all_time"]["usd_saved"],
            "cost_per_hour": self.windows.cost_per_hour,
            "windows": windows,
            "clients": clients,
            "last_request_at": self.last_request_at,
            "uptime": round(time.time() - self.started_at, 3),
            **({"models": self.per_model.as_json()} if self.per_model is not None else {}),
        }

    def exposition(self, openmetrics: bool) -> tuple[bytes, str]:
        if openmetrics:
            return generate_openmetrics(self.registry), OPENMETRICS_TYPE
        return generate_latest(self.registry), PROMETHEUS_TYPE


def wants_prometheus(accept: str, format_param: str | None) -> tuple[bool, bool]:
    """(prometheus?, openmetrics?) from ``?format=`` or the Accept header a Prometheus server sends."""
    if format_param:
        fmt = format_param.lower()
        return fmt in ("prometheus", "openmetrics", "text"), fmt == "openmetrics"
    accept = accept.lower()
    if "application/openmetrics-text" in accept:
        return True, True
    return "text/plain" in accept, False
