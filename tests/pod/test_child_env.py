"""Each helper process is given only the secrets it uses (issue 16): the environment each child would get,
read at the spawn, with no process started."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from llmpod.pod import PodConfig, processes
from llmpod.pod.catalog import builtin_catalog
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import LocalProvider, PodSpec
from llmpod.pod.sidecars import Sidecars
from llmpod.pod.state import PodState, RuntimePaths

SECRETS = {
    "RUNPOD_API_KEY": "rp-secret",
    "HF_TOKEN": "hf-secret",
    "MY_HF": "hf-named-secret",  # the config's hf_token_env below
    "OPENAI_API_KEY": "sk-other",
    "GITHUB_TOKEN": "gh-other",
    "PROXY_API_KEY": "proxy-secret",
}
PLAIN = {"UPSTREAM_TIMEOUT": "77.0", "SOME_SETTING": "kept", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    for name, value in {**SECRETS, **PLAIN}.items():
        monkeypatch.setenv(name, value)
    envs: list[dict[str, str]] = []

    def spawn(argv: Any, *, env: dict[str, str], **_: Any) -> int:
        envs.append(dict(env))
        return 999_999

    monkeypatch.setattr(processes, "spawn_detached", spawn)
    return envs


def config(**extra: Any) -> PodConfig:
    return PodConfig(provider="local", hf_token_env="MY_HF", **extra)


def state() -> PodState:
    now = time.time()
    return PodState(
        provider="local",
        phase="ready",
        pod_name="llmpod-0123abcd",
        model_id="m",
        served_model="m",
        vllm_api_key="pod-vllm-key",
        upstream_url="http://127.0.0.1:9/v1",
        created_at=now,
        expires_at=now + 60,
        idle_timeout_seconds=60,
        proxy_port=9,
    )


def sidecars(tmp_path: Path) -> Sidecars:
    return Sidecars(config(), tmp_path / "pod_config.json", RuntimePaths(tmp_path), Reporter())


def secrets_in(env: dict[str, str]) -> set[str]:
    return {name for name in SECRETS if name in env} | {name for name, v in env.items() if v in SECRETS.values()}


def test_the_proxy_gets_its_upstream_key_and_proxy_key_only(tmp_path: Path, spawned: list[dict[str, str]]) -> None:
    env = sidecars(tmp_path).proxy_env(state())
    assert secrets_in(env) == {"PROXY_API_KEY"}
    assert env["PROXY_API_KEY"] == "proxy-secret" and env["UPSTREAM_API_KEY"] == "pod-vllm-key"
    assert {k: env[k] for k in PLAIN} == PLAIN  # the rest of the user's environment is still inherited


def test_the_watchdog_gets_the_runpod_key_and_proxy_key_but_no_hf_token(
    tmp_path: Path, spawned: list[dict[str, str]]
) -> None:
    sidecars(tmp_path).ensure_watchdog()
    [env] = spawned
    assert secrets_in(env) == {"RUNPOD_API_KEY", "PROXY_API_KEY"}
    assert {k: env[k] for k in PLAIN} == PLAIN  # it rebuilds the proxy's environment when it restarts it


def local_spec() -> PodSpec:
    model = builtin_catalog().models[0]
    return PodSpec("llmpod-0123abcd", None, model, model.id, 4096, "pod-vllm-key")


def test_the_local_mock_gets_its_vllm_key_only(tmp_path: Path, spawned: list[dict[str, str]]) -> None:
    LocalProvider(config(), tmp_path / "pod.log").create(local_spec())
    [env] = spawned
    assert secrets_in(env) == set() and env["VLLM_API_KEY"] == "pod-vllm-key"
    assert env["SOME_SETTING"] == "kept"


def test_a_local_command_keeps_the_hf_token_a_pod_would_get(tmp_path: Path, spawned: list[dict[str, str]]) -> None:
    """A real vLLM as ``command`` may download a gated model; it still never sees the RunPod or proxy keys."""
    LocalProvider(config(command=["vllm", "serve"]), tmp_path / "pod.log").create(local_spec())
    [env] = spawned
    assert secrets_in(env) == {"MY_HF", "OPENAI_API_KEY", "GITHUB_TOKEN"} and env["VLLM_API_KEY"] == "pod-vllm-key"


def test_settings_that_merely_mention_a_token_are_not_taken_for_secrets() -> None:
    env = {"MOCK_FIRST_TOKEN_DELAY": "0.5", "TOKENIZERS_PARALLELISM": "false", "AWS_SECRET_ACCESS_KEY": "x"}
    assert processes.child_env(env) == {"MOCK_FIRST_TOKEN_DELAY": "0.5", "TOKENIZERS_PARALLELISM": "false"}
