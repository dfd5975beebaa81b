"""A ``Session`` wired to the in-memory provider and the fake clock, with helper processes stubbed out.

``make_session`` is what the in-process lifecycle and watchdog tests start from: a real ``Session`` (real state
file, lock, reporter, failover, termination and crash-loop logic) whose provider is ``FakeProvider``, whose time
is ``FakeClock`` (patched into llmpod.pod.lifecycle, .waiting and .watchdog), whose vLLM health check asks the
fake, and whose proxy and watchdog are ``FakeSidecars`` (nothing is spawned; what was asked is recorded).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from llmpod.pod import PodConfig, Session, creation, lifecycle, waiting, watchdog
from llmpod.pod.catalog import builtin_catalog, validate_config
from llmpod.pod.progress import Reporter
from llmpod.pod.state import PodState, RuntimePaths
from tests.fakes.fake_provider import FakeClock, FakeProvider
from tests.support.servers import free_port

A6000, L40S = "NVIDIA RTX A6000", "NVIDIA L40S"
MODEL = "deepseek-coder-33b-instruct-awq"


@dataclass
class FakeSidecars:
    """Stands in for llmpod.pod.sidecars.Sidecars: the proxy's /metrics and /health are what a test sets."""

    metrics: dict[str, Any] | None = field(default_factory=dict)
    healthy: bool = True
    asked: list[str] = field(default_factory=list)

    def proxy_pid(self) -> int | None:
        return None

    def proxy_metrics(self, state: PodState | None = None) -> dict[str, Any] | None:
        return self.metrics

    def proxy_url(self, state: PodState | None = None) -> str:
        return f"http://127.0.0.1:{state.proxy_port if state else 8000}"

    def proxy_health(self, state: PodState | None = None) -> dict[str, Any] | None:
        return {"status": "ok"} if self.healthy else None

    def ensure_proxy(self, state: PodState) -> None:
        self.asked.append("ensure_proxy")

    def ensure_watchdog(self) -> None:
        self.asked.append("ensure_watchdog")

    def stop(self, keep_watchdog: bool = False) -> None:
        self.asked.append("stop(keep_watchdog)" if keep_watchdog else "stop")


@dataclass
class Rig:
    session: Session
    provider: FakeProvider
    clock: FakeClock
    sidecars: FakeSidecars
    said: io.StringIO

    @property
    def text(self) -> str:
        return self.said.getvalue()


def make_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: FakeProvider | None = None, **config: Any
) -> Rig:
    """A Session over ``provider`` (a fresh RunPod-like fake by default), asking for the A6000 then the L40S."""
    clock = provider.clock if provider is not None else FakeClock()
    provider = provider if provider is not None else FakeProvider(clock)
    monkeypatch.setattr(lifecycle, "time", clock)
    monkeypatch.setattr(creation, "time", clock)
    monkeypatch.setattr(watchdog, "time", clock)
    monkeypatch.setattr(waiting, "time", clock)
    settings: dict[str, Any] = {
        "modelStoreId": MODEL,
        "gpu_type_id": A6000,
        "gpu_type_ids": [L40S],
        "proxy_port": free_port(),
        "cache_dir": str(tmp_path / "cache"),
        "ready_timeout_seconds": 600,
        **config,
    }
    pod_config = PodConfig(**settings)
    paths = RuntimePaths(tmp_path)
    paths.ensure()
    catalog = builtin_catalog()
    model, gpus = validate_config(pod_config, catalog)
    said = io.StringIO()
    session = Session(
        config=pod_config,
        config_path=tmp_path / "pod_config.json",
        paths=paths,
        provider=provider,
        catalog=catalog,
        model=model,
        gpus=gpus,
        reporter=Reporter(Console(file=said, width=400, highlight=False)),
        sleep=clock.sleep,
    )
    sidecars = FakeSidecars()
    session.sidecars = sidecars  # type: ignore[assignment]
    monkeypatch.setattr(waiting.ReadyWait, "_vllm_ready", lambda self, url, state: provider.vllm_ready(url))
    return Rig(session, provider, clock, sidecars, said)
