"""The watchdog's decisions (``check_once``), in-process over the in-memory provider and a fake clock.

Expiry, idleness (and what counts as activity), a pod that disappeared, a proxy that stopped answering, an
interrupted shutdown to finish, a RunPod error that is retried. That the detached watchdog process really runs
these rounds and survives a kill is tests/pod/test_manage_pod_e2e.py's and tests/faults/test_cost_safety.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from llmpod.errors import RunPodUnavailable
from llmpod.pod.state import PodState, load_state, save_state
from llmpod.pod.watchdog import Ended, KeepWatching, check_once
from llmpod.proxy import metrics as proxy_metrics
from tests.fakes.fake_session import Rig, make_session


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    rig = make_session(tmp_path, monkeypatch, runtime_seconds=3600, idle_timeout_seconds=600)
    rig.session._create()
    return rig


def state(rig: Rig) -> PodState:
    loaded = load_state(rig.session.paths)
    assert loaded is not None
    return loaded


def reason(rig: Rig) -> str:
    return str(json.loads(rig.session.paths.last_session.read_text())["reason"])


def test_a_fresh_session_is_left_alone(rig: Rig) -> None:
    started = rig.clock.time()
    assert check_once(rig.session, started) == KeepWatching(started)
    assert rig.provider.live() == [state(rig).pod_id]


def test_expiry_terminates_the_pod(rig: Rig) -> None:
    pod_id = state(rig).pod_id
    rig.clock.advance(3601)
    rig.sidecars.metrics = {"in_flight": 1}  # expiry wins over activity
    ended = check_once(rig.session, rig.clock.time())
    assert isinstance(ended, Ended) and ended.why.startswith(f"pod expired: terminated ['{pod_id}'] (spend $")
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None
    assert "expired: runtime_seconds reached" in reason(rig)
    assert rig.sidecars.asked[-1] == "stop(keep_watchdog)"  # the watchdog is the one stopping: it exits itself


def test_idleness_terminates_the_pod(rig: Rig) -> None:
    since = rig.clock.time()
    rig.clock.advance(601)
    rig.sidecars.metrics = {"in_flight": 0, "last_request_at": since - 5}
    ended = check_once(rig.session, since)
    assert isinstance(ended, Ended) and ended.why.startswith("pod idle: terminated")
    assert rig.provider.live() == []
    assert "idle: no answer generated or served for 601s (idle_timeout_seconds=600)" in reason(rig)


@pytest.mark.parametrize("metrics", [{"in_flight": 2}, {"last_request_at": "recent"}])
def test_a_generation_or_a_recent_request_is_activity(rig: Rig, metrics: dict[str, object]) -> None:
    since = rig.clock.time()
    rig.clock.advance(601)
    if metrics.get("last_request_at") == "recent":
        metrics = {"last_request_at": rig.clock.time() - 10}
    rig.sidecars.metrics = metrics
    ended = check_once(rig.session, since)
    assert isinstance(ended, KeepWatching) and (ended.last_activity or 0.0) > since
    assert load_state(rig.session.paths) is not None and rig.provider.live()


def test_failing_requests_do_not_keep_the_pod_alive(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page posting malformed requests every few seconds (and a 499 from a client that left) is not activity."""
    monkeypatch.setattr(proxy_metrics, "time", rig.clock)
    metrics = proxy_metrics.ProxyMetrics(cast(Any, None))  # the proxy's own counters, as /metrics reports them
    since = rig.clock.time()
    rig.clock.advance(100)
    metrics.record(model="m", status=200, cache="MISS", seconds=1.0)  # the last real work
    for _ in range(61):
        rig.clock.advance(10)
        metrics.record(model="-", status=400, cache="NONE", seconds=0.001)
        metrics.record(model="-", status=499, cache="MISS", seconds=0.001)
    rig.sidecars.metrics = {"in_flight": metrics.in_flight, "last_request_at": metrics.last_request_at}
    ended = check_once(rig.session, since)
    assert isinstance(ended, Ended) and ended.why.startswith("pod idle: terminated")
    assert "idle: no answer generated or served for 610s" in reason(rig)


def test_no_idle_timeout_means_never_idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_session(tmp_path, monkeypatch, runtime_seconds=86_400, idle_timeout_seconds=0)
    rig.session._create()
    since = rig.clock.time()
    rig.clock.advance(40_000)
    assert check_once(rig.session, since) == KeepWatching(since)


def test_a_pod_gone_from_runpod_stops_the_proxy_and_clears_the_state(rig: Rig) -> None:
    pod_id = state(rig).pod_id
    assert pod_id is not None
    rig.provider.reclaim(pod_id)
    ended = check_once(rig.session, rig.clock.time())
    assert ended == Ended(f"pod {pod_id} is gone (not found): proxy stopped, state cleared")
    assert load_state(rig.session.paths) is None and "pod disappeared" in reason(rig)


def test_a_proxy_that_does_not_answer_is_restarted(rig: Rig) -> None:
    rig.sidecars.healthy = False
    decision = check_once(rig.session, rig.clock.time())
    assert isinstance(decision, KeepWatching) and decision.last_activity is not None
    assert rig.sidecars.asked == ["ensure_proxy"]


def test_a_runpod_error_reading_the_pod_is_retried_next_round(rig: Rig) -> None:
    def unavailable(pod_id: str) -> None:
        raise RunPodUnavailable("get pod: HTTP 503", 503)

    rig.provider.get = unavailable  # type: ignore[method-assign,assignment]
    since = rig.clock.time()
    assert check_once(rig.session, since) == KeepWatching(since)
    assert load_state(rig.session.paths) is not None


def test_an_interrupted_shutdown_is_finished(rig: Rig) -> None:
    half = state(rig)
    half.phase = "terminating"
    save_state(rig.session.paths, half)
    ended = check_once(rig.session, rig.clock.time())
    assert ended == Ended(f"finished an interrupted shutdown: terminated ['{half.pod_id}']")
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None


def test_a_pod_still_being_created_is_not_judged(rig: Rig) -> None:
    creating = state(rig)
    creating.phase = "waiting"
    save_state(rig.session.paths, creating)
    rig.clock.advance(10_000)
    assert check_once(rig.session, 0.0) == KeepWatching() and rig.provider.live()


def test_no_state_ends_the_watchdog(rig: Rig) -> None:
    rig.session.shutdown()
    assert check_once(rig.session, rig.clock.time()) == Ended("no pod recorded any more: exiting")
