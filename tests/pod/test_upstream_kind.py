"""The pod manager tells the proxy what it started behind it (UPSTREAM_KIND), which the proxy's cache keys name:
the bundled mock for ``--local``, vLLM for a RunPod pod. Read from the environment the proxy would be given."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import pytest

from llmpod.pod import PodConfig
from llmpod.pod.progress import Reporter
from llmpod.pod.sidecars import Sidecars
from llmpod.pod.state import PodState, RuntimePaths
from llmpod.proxy_settings import ProxySettings


def state(provider: Literal["runpod", "local"]) -> PodState:
    now = time.time()
    return PodState(
        provider=provider,
        phase="ready",
        pod_name="llmpod-0123abcd",
        model_id="m",
        served_model="m",
        vllm_api_key="k",
        upstream_url="http://127.0.0.1:9/v1",
        created_at=now,
        expires_at=now + 60,
        idle_timeout_seconds=60,
        proxy_port=9,
    )


def proxy_kind(tmp_path: Path, provider: Literal["runpod", "local"], **config: Any) -> str | None:
    sidecars = Sidecars(PodConfig(provider=provider, **config), tmp_path / "c.json", RuntimePaths(tmp_path), Reporter())
    env = sidecars.proxy_env(state(provider))
    return ProxySettings.from_env(env).upstream_kind  # what the proxy reads back


def test_local_hands_the_proxy_the_mock_and_runpod_hands_it_vllm(tmp_path: Path) -> None:
    assert proxy_kind(tmp_path, "local") == "mock"
    assert proxy_kind(tmp_path, "runpod") == "vllm"


def test_a_local_command_of_the_users_leaves_the_kind_to_the_server(tmp_path: Path) -> None:
    # it may be a real vLLM: the proxy learns the kind from its first answer
    assert proxy_kind(tmp_path, "local", command=["vllm", "serve"]) is None


@pytest.mark.parametrize("provider", ["local", "runpod"])
def test_the_users_shell_cannot_set_the_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: Literal["runpod", "local"]
) -> None:
    monkeypatch.setenv("UPSTREAM_KIND", "vllm" if provider == "local" else "mock")
    assert proxy_kind(tmp_path, provider) == ("mock" if provider == "local" else "vllm")
    monkeypatch.setenv("UPSTREAM_KIND", "mock")
    assert proxy_kind(tmp_path, "local", command=["vllm", "serve"]) is None


def test_several_models_get_no_decided_setting_from_the_users_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The several-models proxy is built by the same function as one pod's: a shell's UPSTREAM_KIND or
    TOOL_CAPABLE_MODELS never reaches it, while what the pod manager does not decide (PROXY_API_KEY) does."""
    from llmpod.backends import Backend
    from llmpod.pod.sidecars import proxy_environment

    monkeypatch.setenv("UPSTREAM_KIND", "mock")
    monkeypatch.setenv("TOOL_CAPABLE_MODELS", "anything")
    monkeypatch.setenv("PROXY_API_KEY", "proxy-key-for-tests-0123456789")
    backends = (Backend(id="chat", base_url="http://127.0.0.1:9/v1"),)
    env = proxy_environment(PodConfig(), tmp_path, {}, upstream_url=backends[0].base_url, port=9, backends=backends)
    settings = ProxySettings.from_env(env)
    assert settings.upstream_kind is None and settings.tool_capable_models == ()
    assert settings.backends == backends and settings.proxy_api_key is not None
