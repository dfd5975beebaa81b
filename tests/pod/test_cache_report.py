"""--status and --shutdown say what the cache did: the hit rates (all-time, recent, last hour; per client) and what
it saved (tokens, generation seconds, dollars at the pod's $/h, handed to the proxy by the pod manager)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from llmpod.pod import PodConfig, cli
from llmpod.pod import output as report
from llmpod.pod.progress import Reporter
from llmpod.pod.sidecars import Sidecars
from llmpod.pod.state import RuntimePaths
from llmpod.proxy.cache import ResponseCache
from llmpod.proxy.metrics import ProxyMetrics
from llmpod.proxy_settings import ProxySettings
from tests.fakes.fake_session import Rig, make_session
from tests.test_proxy_settings_contract import ready_state


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    rig = make_session(tmp_path, monkeypatch)
    rig.session._create()
    return rig


def proxy_metrics(tmp_path: Path, cost_per_hour: float) -> dict[str, Any]:
    """The proxy's JSON /metrics after a few requests: kilo hit twice (30 tokens, 90 s saved), aider missed."""
    metrics = ProxyMetrics(ResponseCache(tmp_path / "c", 10, 10**6), cost_per_hour=cost_per_hour)
    metrics.record(model="m", status=200, cache="MISS", seconds=45.0, client="kilo")
    for _ in range(2):
        metrics.record(
            model="m", status=200, cache="HIT", seconds=0.001, cached_tokens=15, client="kilo", saved_seconds=45.0
        )
    metrics.record(model="m", status=200, cache="MISS", seconds=2.0, client="aider")
    return metrics.as_json(0)


def test_status_shows_hit_rates_per_client_and_savings(rig: Rig, tmp_path: Path) -> None:
    rig.sidecars.metrics = proxy_metrics(tmp_path, cost_per_hour=0.8)
    data = report.status(rig.session)
    cache = data["proxy"]["cache"]
    assert cache["all_time"]["hits"] == 2 and cache["clients"]["kilo"]["recent"]["hit_rate"] == round(2 / 3, 4)
    assert cache["all_time"]["usd_saved"] == 0.02 and cache["cost_per_hour"] == 0.8  # 90 s at $0.80/h
    text = report.status_text(data)
    assert "hit rate" in text and "50% of 4 all-time, 50% of the last 4, 50% of 4 in the last hour" in text
    assert "  kilo" in text and "67% of 3 all-time" in text and "  aider" in text and "0% of 1 all-time" in text
    assert "cache saved" in text and "30 tokens, 1m30s of generation, $0.02 (last hour: 30 tokens" in text
    assert "at $0.80/h" in text


def test_status_without_the_proxys_figures_leaves_them_out(rig: Rig) -> None:
    rig.sidecars.metrics = None  # the proxy is down
    text = report.status_text(report.status(rig.session))
    assert "hit rate" not in text and "cache saved" not in text


def test_shutdown_says_what_the_cache_saved_read_before_the_proxy_stops(
    rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.sidecars.metrics = proxy_metrics(tmp_path, cost_per_hour=0.8)
    stop = rig.sidecars.stop

    def stop_proxy(keep_watchdog: bool = False) -> None:
        rig.sidecars.metrics = None  # a stopped proxy answers nothing
        stop(keep_watchdog)

    monkeypatch.setattr(rig.sidecars, "stop", stop_proxy)
    assert cli.cmd_shutdown(rig.session, argparse.Namespace(all=False)) == 0
    out = capsys.readouterr().out
    assert "terminated: " in out
    assert (
        "cache: 2 hits of 4 lookups (50%) since the proxy started, saved 30 tokens, 1m30s of generation, $0.02" in out
    )


def test_shutdown_with_no_proxy_answering_says_nothing_of_the_cache(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.sidecars.metrics = None
    assert cli.cmd_shutdown(rig.session, argparse.Namespace(all=False)) == 0
    assert "cache:" not in capsys.readouterr().out


@pytest.mark.parametrize(("recorded", "expected"), [(0.79, 0.79), (0.0, 0.0), (None, 0.0)])
def test_the_pods_price_reaches_the_proxy(tmp_path: Path, recorded: float | None, expected: float) -> None:
    """RunPod's costPerHr, recorded in pod_state.json, becomes the proxy's $/h; --local's pod costs nothing."""
    sidecars = Sidecars(PodConfig(), tmp_path / "pod_config.json", RuntimePaths(tmp_path), Reporter())
    state = ready_state(8000)
    state.cost_per_hour = recorded
    assert ProxySettings.from_env(sidecars.proxy_env(state)).cost_per_hour == expected
