"""Hit rates and what the cache saved, all-time, over the last N lookups and over the last hour, overall and per
client family: ``CacheWindows``, which ``ProxyMetrics`` feeds and /metrics shows.

An all-time rate soon says nothing about today (a morning of misses weighs on the afternoon forever); the windows
say what the cache does now. Memory is bounded whatever the traffic: the last-N window keeps N small tuples, the
hour 60 one-minute buckets of at most one tally per client family.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

LOOKUPS = frozenset(("HIT", "MISS", "COALESCED"))  # the outcomes of a cache lookup; BYPASS and NONE are not
MINUTES = 60


@dataclass(slots=True)
class Tally:
    """Lookups, hits, and what the hits saved: completion tokens and the seconds their generation took."""

    lookups: int = 0
    hits: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, hit: bool, tokens: int, seconds: float) -> None:
        self.lookups += 1
        if hit:
            self.hits += 1
            self.tokens += tokens
            self.seconds += seconds

    def merge(self, other: Tally) -> None:
        self.lookups += other.lookups
        self.hits += other.hits
        self.tokens += other.tokens
        self.seconds += other.seconds

    def rate(self) -> float:
        return round(self.hits / self.lookups, 4) if self.lookups else 0.0

    def view(self, cost_per_hour: float) -> dict[str, Any]:
        return {
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.rate(),
            "tokens_saved": self.tokens,
            "generation_seconds_saved": round(self.seconds, 3),
            "usd_saved": round(self.seconds * cost_per_hour / 3600, 6),
        }


class CacheWindows:
    """Every cache lookup's outcome, summed all-time, over the last ``size`` lookups and the last hour."""

    def __init__(self, size: int, cost_per_hour: float) -> None:
        self.size = size
        self.cost_per_hour = cost_per_hour
        self.all_time = Tally()
        self.clients: dict[str, Tally] = {}  # by family: a fixed, small set (clients.FAMILIES)
        self._recent: deque[tuple[str, bool, int, float]] = deque(maxlen=size)
        self._minutes: deque[tuple[int, dict[str, Tally]]] = deque()  # (minute number, tallies by family)

    def record(self, now: float, client: str, cache: str, tokens: int, seconds: float) -> None:
        """One request's outcome; only lookups (HIT, MISS, COALESCED) count. ``tokens`` and ``seconds`` are
        what a hit saved (0 for anything else)."""
        if cache not in LOOKUPS:
            return
        hit = cache == "HIT"
        self.all_time.add(hit, tokens, seconds)
        per_client = self.clients.get(client)
        if per_client is None:
            per_client = self.clients[client] = Tally()
        per_client.add(hit, tokens, seconds)
        self._recent.append((client, hit, tokens, seconds))
        minute = int(now // 60)
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, {}))
            self._prune(minute)
        bucket = self._minutes[-1][1]
        tally = bucket.get(client)
        if tally is None:
            tally = bucket[client] = Tally()
        tally.add(hit, tokens, seconds)

    def _prune(self, minute: int) -> None:
        while self._minutes and self._minutes[0][0] <= minute - MINUTES:
            self._minutes.popleft()

    def recent(self) -> tuple[Tally, dict[str, Tally]]:
        """The last ``size`` lookups: overall, and by family."""
        total, by_client = Tally(), dict[str, Tally]()
        for client, hit, tokens, seconds in self._recent:
            total.add(hit, tokens, seconds)
            tally = by_client.get(client)
            if tally is None:
                tally = by_client[client] = Tally()
            tally.add(hit, tokens, seconds)
        return total, by_client

    def last_hour(self, now: float) -> tuple[Tally, dict[str, Tally]]:
        """The lookups of the last 60 minutes (whole minutes: the current one and the 59 before): overall, and by
        family."""
        minute = int(now // 60)
        total, by_client = Tally(), dict[str, Tally]()
        for number, bucket in self._minutes:
            if number <= minute - MINUTES:
                continue
            for client, tally in bucket.items():
                total.merge(tally)
                by_client.setdefault(client, Tally()).merge(tally)
        return total, by_client

    def as_json(self, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """(windows, clients) for /metrics: each window's hit rate and savings, overall and per family seen."""
        cost = self.cost_per_hour
        recent, recent_by = self.recent()
        hour, hour_by = self.last_hour(now)
        windows = {
            "all_time": self.all_time.view(cost),
            "recent": {**recent.view(cost), "size": self.size},
            "last_hour": hour.view(cost),
        }
        clients = {
            name: {
                "all_time": tally.view(cost),
                "recent": recent_by.get(name, Tally()).view(cost),
                "last_hour": hour_by.get(name, Tally()).view(cost),
            }
            for name, tally in sorted(self.clients.items())
        }
        return windows, clients

    def rate(self, window: str, now: float) -> float:
        """One window's hit rate, for the Prometheus gauge."""
        if window == "recent":
            return self.recent()[0].rate()
        if window == "last_hour":
            return self.last_hour(now)[0].rate()
        return self.all_time.rate()
