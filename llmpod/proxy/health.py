"""Each backend's health, when several models sit behind the proxy (issue 18).

Two sources, combined when a request or ``/health`` asks (``BackendHealth.current``):

- the proxy's own probe of the backend, on an interval (``PROXY_HEALTH_INTERVAL``): its ``/health`` answers 200
  and its ``/v1/models`` lists something. A request that finds the backend unreachable (or cut mid-answer) marks
  it down at once and wakes the probe, so the requests after it get a 503 without waiting for the interval;
- the supervisor's state file (``llmpod.backends.BackendState``), for what a probe cannot see: that the user
  stopped the model, that it is being restarted, how often, why it is down.

``stopped`` and ``restarting`` from the supervisor win; otherwise the model is ``healthy`` if the probe answers,
``down`` (with the last error) if it does not or the supervisor gave up on it, and ``starting`` until the probe has
answered once (or while the supervisor says it is starting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmpod.backends import Backend, BackendState, Lifecycle, read_state
from llmpod.errors import UpstreamError
from llmpod.proxy.wire import error_body

if TYPE_CHECKING:
    from llmpod.proxy.upstream import Upstream

log = logging.getLogger("llmpod.proxy")
REFUSED: frozenset[str] = frozenset({"stopped", "restarting", "down"})


@dataclass(frozen=True)
class ModelHealth:
    """One model's state as ``/health``, ``/v1/models`` and the metrics show it."""

    state: Lifecycle
    since: float  # epoch seconds it has been in this state
    last_error: str | None
    restarts: int  # from the supervisor's state file (0 for an external server)
    probed: bool  # the proxy's probe has reached a verdict at least once

    def as_json(self) -> dict[str, object]:
        return {"state": self.state, "since": self.since, "last_error": self.last_error, "restarts": self.restarts}


class BackendHealth:
    """Probes one backend on an interval and judges its state (module doc)."""

    def __init__(self, backend: Backend, upstream: Upstream, interval: float) -> None:
        self.backend = backend
        self.upstream = upstream
        self.interval = interval
        self.ok_at = 0.0  # monotonic time of the last probe that answered healthy
        self.failed_at = 0.0  # monotonic time of the last probe or request that found it broken
        self.error: str | None = None
        self.probed = False
        self._wake = asyncio.Event()
        self._state: Lifecycle | None = None
        self._since = time.time()
        self._file: tuple[tuple[int, int, int], BackendState | None] | None = None

    # ----------------------------------------------------------------- probing
    async def probe_once(self) -> None:
        result = await self.upstream.probe()
        self.probed = True
        if result.get("reachable") and result.get("status_code") == 200 and result.get("models"):
            self.ok_at = time.monotonic()
            return
        self.failed_at = time.monotonic()
        self.error = result.get("error") or "the server lists no model on /v1/models"

    async def run(self, follow: Callable[[], None] | None = None) -> None:
        """Probe until cancelled (the app's lifespan owns this task); ``follow`` first moves to a new server the
        state file names (ModelRouter.follow)."""
        while True:
            self._wake.clear()
            try:
                if follow is not None:
                    follow()
                await self.probe_once()
            except Exception:  # a probe must never end the loop: the next one may succeed
                log.exception("health probe of model %s failed", self.backend.id)
            self.current()  # logs a change of state as soon as it is seen
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    def failed(self, message: str) -> None:
        """A request found the backend unreachable or cut: down now, and probed again at once."""
        self.failed_at = time.monotonic()
        self.error = message
        self._wake.set()

    def moved_to(self) -> BackendState | None:
        """The state file names another server for this model (a RunPod model's pod replaced), or None."""
        supervised = self._supervised()
        if supervised is None or not supervised.base_url:
            return None
        same_url = supervised.base_url.rstrip("/") == self.backend.base_url
        return None if same_url and supervised.api_key == self.backend.api_key else supervised

    def moved(self, backend: Backend, upstream: Upstream) -> None:
        """Now at ``backend``'s server: judged afresh, and probed at once."""
        self.backend, self.upstream = backend, upstream
        self.ok_at = self.failed_at = 0.0
        self.probed, self.error = False, None
        self._wake.set()

    # ----------------------------------------------------------------- judging
    def current(self) -> ModelHealth:
        supervised = self._supervised()
        restarts = supervised.restarts if supervised else 0
        lost_at = max(self.failed_at, self.upstream.lost_at)
        if supervised is not None and supervised.state in ("stopped", "restarting"):
            return self._judged(supervised.state, supervised.last_error, restarts, supervised.since)
        if self.ok_at and self.ok_at >= lost_at:
            return self._judged("healthy", None, restarts)
        if supervised is not None and supervised.state == "down":
            return self._judged("down", supervised.last_error or self.error, restarts, supervised.since)
        if (supervised is not None and supervised.state == "starting") or not (self.probed or lost_at):
            return self._judged("starting", self.error, restarts)
        return self._judged("down", self.error or "the server is unreachable", restarts)

    def _supervised(self) -> BackendState | None:
        """The state file's content, parsed again only when the file changed: every miss asks."""
        if not self.backend.state_file:
            return None
        try:
            seen = os.stat(self.backend.state_file)
        except OSError:
            self._file = None
            return None
        stamp = (seen.st_mtime_ns, seen.st_size, seen.st_ino)
        if self._file is None or self._file[0] != stamp:
            self._file = (stamp, read_state(self.backend.state_file))
        return self._file[1]

    def _judged(self, state: Lifecycle, error: str | None, restarts: int, since: float | None = None) -> ModelHealth:
        if state != self._state:
            if self._state is not None:
                level = logging.INFO if state in ("healthy", "starting", "stopped") else logging.WARNING
                log.log(level, "model %s is %s%s", self.backend.id, state, f": {error}" if error else "")
            self._state, self._since = state, time.time()
        return ModelHealth(state, since or self._since, error, restarts, self.probed)

    def refusal(self) -> UpstreamError | None:
        """The clean 503 a request that needs this backend gets while it cannot answer; None when it can.

        ``starting`` before the first probe has reached a verdict is let through: the proxy has just started and
        has no reason to doubt the backend yet (a real failure then is the usual 502)."""
        health = self.current()
        if health.state == "healthy" or (health.state == "starting" and not health.probed):
            return None
        reason = f": {health.last_error}" if health.last_error else ""
        message = f"model {self.backend.id} is {health.state}{reason}"
        retry = str(max(1, round(self.interval)))
        body = error_body(message, 503, type="ServiceUnavailableError")
        return UpstreamError(503, body, {"retry-after": retry})
