"""``llmModels`` in pod_config.json (issue 18): the three kinds of entry, inheritance, and one line per bad entry."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from llmpod._net import free_port
from llmpod.errors import ConfigError
from llmpod.pod import load_pod_config
from llmpod.pod.models_config import check_ports_free, load_models


def local(port: int, model: str = "m", **more: Any) -> dict[str, Any]:
    return {
        "command": sys.executable,
        "args": ["-m", "llmpod.mock", "--model", model, "--port", str(port)],
        "endpoints": {"base_url": f"http://127.0.0.1:{port}/v1"},
        **more,
    }


def load(tmp_path: Path, models: dict[str, Any], **top: Any) -> Any:
    path = tmp_path / "pod_config.json"
    path.write_text(json.dumps({**top, "llmModels": models}))
    return load_models(load_pod_config(path), tmp_path, str(path))


def refused(tmp_path: Path, models: dict[str, Any], **top: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, models, **top)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_three_kinds_and_their_defaults(tmp_path: Path) -> None:
    specs = load(
        tmp_path,
        {
            "chat": local(8001, "chat", restart_policy="always", max_restarts=2, restart_window_seconds=60),
            "docs": {"endpoints": {"base_url": "http://10.0.0.5:8000/v1/"}, "aliases": ["documentation"]},
            "big": {"modelStoreId": "qwen2.5-coder-7b-instruct", "gpu_type_id": "NVIDIA L40S"},
        },
        image="vllm/vllm-openai:v0.26.0",
        idle_timeout_seconds=60,
    )
    chat, docs, big = specs
    assert (chat.kind, chat.port, chat.argv[0], chat.restart_policy, chat.max_restarts) == (
        "local",
        8001,
        sys.executable,
        "always",
        2,
    )
    assert chat.restart_window_seconds == 60
    assert (docs.kind, docs.base_url, docs.aliases, docs.restart_policy) == (
        "external",
        "http://10.0.0.5:8000/v1",
        ("documentation",),
        "on-failure",
    )
    assert big.kind == "runpod" and big.pod is not None
    # its own keys, and the top level's where it sets none
    assert (big.pod.modelStoreId, big.pod.gpu_type_id) == ("qwen2.5-coder-7b-instruct", "NVIDIA L40S")
    assert (big.pod.image, big.pod.idle_timeout_seconds) == ("vllm/vllm-openai:v0.26.0", 60)
    backend = chat.backend("/run/chat.state.json")
    assert (backend.id, backend.base_url, backend.state_file) == (
        "chat",
        "http://127.0.0.1:8001/v1",
        "/run/chat.state.json",
    )
    assert docs.backend("/x").state_file is None  # external: judged by the proxy's probes alone


def test_a_command_relative_to_the_config_folder(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "serve.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (spec,) = load(tmp_path, {"m": {"command": "bin/serve.sh", "endpoints": {"base_url": "http://127.0.0.1:9/v1"}}})
    assert spec.argv == (str(script),)


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"m": {**local(8001), "colour": "red"}}, "llmModels.m: unknown key colour='red'"),
        ({"m": {**local(8001), "restart_polcy": "always"}}, "(did you mean restart_policy?)"),
        ({"a": local(8001), "b": local(8001)}, "llmModels.b: port 8001 is also llmModels.a's"),
        ({"a": local(8000)}, "llmModels.a: port 8000 is also proxy_port's"),
        (
            {"m": {**local(8001), "command": "no-such-program-xyz"}},
            "llmModels.m: command 'no-such-program-xyz' is not found",
        ),
        ({"m": {**local(8001), "command": "./missing.sh"}}, "llmModels.m: command './missing.sh' is not found"),
        ({"-bad": local(8001)}, "llmModels: '-bad' is not a model id"),
        ({"m": "python3"}, "llmModels.m: must be a JSON object"),
        ({"m": {"command": "python3"}}, "llmModels.m: needs endpoints.base_url"),
        ({"m": {**local(8001), "restart_policy": "sometimes"}}, "llmModels.m: restart_policy="),
        ({"m": {**local(8001), "max_restarts": -1}}, "llmModels.m: max_restarts="),
        ({"m": {**local(8001), "endpoints": {"base_url": "ftp://x/v1"}}}, "is not an http(s) URL"),
        ({"m": {**local(8001), "endpoints": {"base_url": "http://10.1.1.1:8001/v1"}}}, "must be on this machine"),
        ({"m": {**local(8001), "endpoints": {"base_url": "http://127.0.0.1/v1"}}}, "names no port"),
        ({"m": {**local(8001), "gpu_type_id": "NVIDIA L40S"}}, "gpu_type_id is a RunPod setting"),
        ({"m": {"modelStoreId": "x", "image": "vllm/vllm-openai:latest"}}, "llmModels.m: image="),
        ({"m": {"modelStoreId": "x", **local(8001)}}, "llmModels.m: has modelStoreId and command"),
        ({"a": local(8001, aliases=["b"]), "b": local(8002)}, "the name 'b' is also a's"),
        ({"m": {"endpoints": {"base_url": "http://10.0.0.5/v1"}, "env": {"A": "1"}}}, "no command to give them to"),
    ],
)
def test_a_bad_entry_is_one_line_naming_it(tmp_path: Path, models: dict[str, Any], expected: str) -> None:
    assert expected in refused(tmp_path, models, proxy_port=8000)


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    port = free_port()
    specs = load(tmp_path, {"chat": local(port)})
    check_ports_free(specs)  # free: nothing to say
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(ConfigError, match=rf"llmModels.chat: port {port} .* is in use by another program"):
            check_ports_free(specs)


def test_a_runpod_entry_without_a_key_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before anything starts (no local model either): the RunPod key is asked for as for one pod."""
    from llmpod.pod.cli import main

    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    path = tmp_path / "pod_config.json"
    local = {"command": sys.executable, "args": ["-c", "pass"], "endpoints": {"base_url": "http://127.0.0.1:9/v1"}}
    path.write_text(json.dumps({"llmModels": {"chat": local, "big": {"modelStoreId": "qwen2.5-coder-7b-instruct"}}}))
    assert main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith("manage_pod.py: RUNPOD_API_KEY is not set")
    assert not (tmp_path / "pod_state.json").exists()


def test_a_runpod_entry_with_an_image_of_unknown_cuda_is_refused_before_any_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmpod.pod.cli import main

    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_not_used")
    monkeypatch.setenv("RUNPOD_API_BASE", "http://127.0.0.1:9")  # nobody there: a call would fail otherwise
    path = tmp_path / "pod_config.json"
    entry = {"modelStoreId": "qwen2.5-coder-7b-instruct", "image": "someone/vllm:custom"}
    path.write_text(json.dumps({"llmModels": {"big": entry}}))
    assert main(["--config", str(path)]) == 2
    assert "llmModels.big" in capsys.readouterr().err
    assert not (tmp_path / "pod_state.json").exists()


def test_start_stop_restart_need_llm_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmpod.pod.cli import main

    path = tmp_path / "pod_config.json"
    path.write_text(json.dumps({"provider": "local"}))
    assert main(["--config", str(path), "--stop", "chat"]) == 2
    assert "--stop acts on a model of llmModels" in capsys.readouterr().err


def test_the_readme_pair_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Several models", 1)[1]
    block = section.split("```json\n", 1)[1].split("```", 1)[0]
    chat, autocomplete = load(tmp_path, json.loads(block)["llmModels"], proxy_port=json.loads(block)["proxy_port"])
    assert (chat.id, chat.port, autocomplete.id, autocomplete.port) == ("chat", 8001, "autocomplete", 8002)
    assert autocomplete.restart_policy == "always"


def test_the_readme_runpod_pair_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Several models", 1)[1]
    block = section.split("```json\n", 2)[2].split("```", 1)[0]
    chat, autocomplete = load(tmp_path, json.loads(block)["llmModels"], proxy_port=json.loads(block)["proxy_port"])
    assert (chat.kind, autocomplete.kind) == ("runpod", "local")
    assert chat.pod is not None and chat.pod.idle_timeout_seconds == 1800 and chat.pod.max_hourly_cost == 1.2


def test_a_runpod_entry_the_catalog_refuses_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmpod.pod.cli import main

    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_not_used")
    monkeypatch.setenv("RUNPOD_API_BASE", "http://127.0.0.1:9")
    path = tmp_path / "pod_config.json"
    path.write_text(json.dumps({"llmModels": {"big": {"modelStoreId": "no-such-model"}}}))
    assert main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith("manage_pod.py: pod_config.json: llmModels.big: unknown modelStoreId")
