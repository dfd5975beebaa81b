"""The ready message: what a user pastes into Kilo Code (kilo.json for the CLI and current extension, the legacy
extension's fields), with the API key that actually works and whether the model can be an agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmpod.pod import PodConfig, Session
from llmpod.pod.catalog import builtin_catalog
from llmpod.pod.output import ready_text
from llmpod.pod.providers import LocalProvider
from llmpod.pod.state import PodState, RuntimePaths

CATALOG = builtin_catalog()


def ready(tmp_path: Path, model_id: str, **config: Any) -> str:
    pod_config = PodConfig(provider="local", modelStoreId=model_id, proxy_port=8123, **config)
    session = Session(
        config=pod_config,
        config_path=tmp_path / "pod_config.json",
        paths=RuntimePaths(tmp_path),
        provider=LocalProvider(pod_config, tmp_path / "pod.log"),
        catalog=CATALOG,
        model=CATALOG.model(model_id),
        gpus=[],
    )
    state = PodState(
        provider="local",
        phase="ready",
        pod_name="llmpod-0123abcd",
        model_id=model_id,
        served_model=model_id,
        vllm_api_key="vllm-key",
        created_at=0.0,
        expires_at=3600.0,
        idle_timeout_seconds=1800,
        proxy_port=8123,
    )
    return ready_text(session, state)


def kilo_json(text: str) -> dict[str, Any]:
    start = text.index("\n{") + 1
    end = text.index("\n}", start) + 2
    return json.loads(text[start:end])  # type: ignore[no-any-return]


def test_the_kilo_json_block_configures_the_proxy_as_a_provider(tmp_path: Path) -> None:
    text = ready(tmp_path, "qwen2.5-coder-32b-instruct-awq")

    config = kilo_json(text)
    provider = config["provider"]["llmpod"]
    assert config["model"] == "llmpod/qwen2.5-coder-32b-instruct-awq"
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"] == {"baseURL": "http://127.0.0.1:8123/v1", "apiKey": "none"}
    # Kilo asks for max_tokens = min(limit.output, 32000): a quarter of the context leaves the prompt room
    assert provider["models"]["qwen2.5-coder-32b-instruct-awq"] == {
        "name": "qwen2.5-coder-32b-instruct-awq",
        "tool_call": True,
        "limit": {"context": 32768, "output": 8192},
    }
    assert "works as an agent" in text
    assert (
        "Kilo Code (legacy 5.x extension): provider 'OpenAI Compatible', Base URL http://127.0.0.1:8123/v1, "
        "API key 'none', model 'qwen2.5-coder-32b-instruct-awq'" in text
    )
    assert "API key:  none set (PROXY_API_KEY): any value works" in text


def test_a_proxy_key_is_referred_to_never_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 'none' would get a 401, and the key itself must not land in scrollback or a CI log: kilo.json names the
    # variable (Kilo CLI 7.7.7 sent "Bearer <key>" for {env:PROXY_API_KEY} in ~/.config/kilo/kilo.json)
    monkeypatch.setenv("PROXY_API_KEY", "sk-llmpod-test-key\n")

    text = ready(tmp_path, "qwen2.5-coder-32b-instruct-awq")

    assert "sk-llmpod-test-key" not in text
    assert kilo_json(text)["provider"]["llmpod"]["options"]["apiKey"] == "{env:PROXY_API_KEY}"
    assert "in ~/.config/kilo/kilo.json (run Kilo where PROXY_API_KEY is exported)" in text
    assert "API key:  the value of PROXY_API_KEY in your environment" in text
    assert "API key your PROXY_API_KEY" in text and "'none'" not in text


def test_a_model_without_tool_calling_says_what_it_is_good_for(tmp_path: Path) -> None:
    text = ready(tmp_path, "deepseek-coder-33b-instruct-awq", max_model_len=8192)

    entry = kilo_json(text)["provider"]["llmpod"]["models"]["deepseek-coder-33b-instruct-awq"]
    assert entry["tool_call"] is False and entry["limit"] == {"context": 8192, "output": 2048}
    assert "no tool calling: chat, edit and autocomplete only (agents need one of: qwen2.5-coder-7b-instruct," in text
