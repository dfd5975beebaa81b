"""The watchdog: a detached ``manage_pod.py --watchdog`` that keeps the session honest while the user works.

Every ``watchdog_interval_seconds`` it checks, in order: the pod's expiry (``runtime_seconds``, wall clock,
so a laptop that slept past it shuts down on waking), idleness (no proxy request for
``idle_timeout_seconds``, read from the proxy's ``/metrics``), that the pod still exists, and that the proxy
answers (restarting it if not); and it finishes a shutdown that a killed manage_pod.py left half-done. When
it ends a session it says why in its log and in last_session.json.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from llmpod.errors import ConfigError, LlmpodError, RunPodAuthError, RunPodError
from llmpod.pod import processes
from llmpod.pod.lifecycle import Session
from llmpod.pod.output import clock
from llmpod.pod.sidecars import PROXY_OF, stop_proxy
from llmpod.pod.state import clear_state, exclusive, load_state, record_last_session


@dataclass(frozen=True)
class Ended:
    """The session is over (the watchdog logs why and exits)."""

    why: str


@dataclass(frozen=True)
class KeepWatching:
    """Check again after the interval; ``last_activity`` is the latest activity seen, when this round read it."""

    last_activity: float | None = None


Decision = Ended | KeepWatching


def log(message: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{stamp} watchdog: {message}", flush=True)


def run_watchdog(session: Session) -> int:
    try:
        return _loop(session)
    finally:
        # leave no pid file naming a process that is gone (unless a newer watchdog replaced it)
        if processes.read_pid(session.paths.watchdog_pid) == os.getpid():
            session.paths.watchdog_pid.unlink(missing_ok=True)


def _loop(session: Session) -> int:
    interval = float(session.config.watchdog_interval_seconds)
    last_activity = time.time()
    log(f"started (interval {interval:g}s)")
    while True:
        try:
            decision = check_once(session, last_activity)
        except ConfigError as exc:
            log(f"stopping: {exc}")
            return 1
        except RunPodAuthError as exc:
            log(
                f"RunPod refused the API key ({exc}); the pod cannot be checked or terminated from here: "
                "fix RUNPOD_API_KEY and run `python3 manage_pod.py --shutdown`"
            )
            decision = KeepWatching()
        except LlmpodError as exc:
            log(f"check failed, will retry: {exc}")
            decision = KeepWatching()
        if isinstance(decision, Ended):
            log(decision.why)
            return 0
        if decision.last_activity is not None:
            last_activity = decision.last_activity
        time.sleep(interval)


def check_once(session: Session, last_activity: float) -> Decision:
    """One round: the session ended (and why), or keep watching (with the latest activity time when read)."""
    state = load_state(session.paths)
    if state is None:
        return Ended("no pod recorded any more: exiting")
    if state.phase == "terminating":
        # left half-done by a manage_pod.py killed while terminating (a live one holds the lock: we wait, then
        # find nothing to do): finish it, or the pod bills until the user next runs something
        result = session.shutdown(reason="finished a shutdown that was interrupted", from_watchdog=True)
        return Ended(f"finished an interrupted shutdown: terminated {result.terminated}")
    if state.phase != "ready":
        return KeepWatching()  # a manage_pod.py is still creating it
    now = time.time()
    if now >= state.expires_at:
        result = session.shutdown(
            reason=f"expired: runtime_seconds reached at {clock(state.expires_at)}", from_watchdog=True
        )
        return Ended(f"pod expired: terminated {result.terminated} (spend ${result.spend_usd or 0:.2f})")
    metrics = session.sidecars.proxy_metrics(state)
    if metrics is not None:
        if metrics.get("in_flight"):
            last_activity = now  # a long generation is activity too
        if isinstance(metrics.get("last_request_at"), int | float):
            last_activity = max(last_activity, float(metrics["last_request_at"]))
    idle_for = now - max(last_activity, state.ready_at or 0.0)
    if state.idle_timeout_seconds and idle_for >= state.idle_timeout_seconds:
        result = session.shutdown(
            reason=(
                f"idle: no answer generated or served for {idle_for:.0f}s "
                f"(idle_timeout_seconds={state.idle_timeout_seconds})"
            ),
            from_watchdog=True,
        )
        return Ended(f"pod idle: terminated {result.terminated} (spend ${result.spend_usd or 0:.2f})")
    assert state.pod_id is not None
    try:
        pod = session.provider.get(state.pod_id)
    except RunPodError as exc:
        log(f"could not read pod {state.pod_id}: {exc}")
        return KeepWatching(last_activity)
    if pod is None or not pod.alive:
        with exclusive(session.paths, 60.0):
            stop_proxy(session.paths.proxy_pid, (PROXY_OF, str(session.paths.root)))
            record_last_session(
                session.paths, state, "pod disappeared (terminated outside llmpod or reclaimed)", session.spend(state)
            )
            clear_state(session.paths)
        return Ended(f"pod {state.pod_id} is gone ({pod.status if pod else 'not found'}): proxy stopped, state cleared")
    if session.sidecars.proxy_health(state) is None:
        log("the proxy is not answering: restarting it")
        session.sidecars.ensure_proxy(state)
    return KeepWatching(last_activity)
