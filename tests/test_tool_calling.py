"""Tool calling end to end on our side: the flags a pod gets for its model, what manage_pod.py tells the proxy,
and the proxy's one-line 400 for a tools request a pod without a parser would refuse (vLLM 0.33.0 refuses
tools with tool_choice absent, "auto", "required" or named; "none" and null pass: checked on its own server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpod.mock.cli import parse as parse_mock_argv
from llmpod.pod import PodConfig
from llmpod.pod.catalog import builtin_catalog
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import LocalProvider, PodSpec, upstream_tool_calling, vllm_args
from llmpod.pod.sidecars import Sidecars
from llmpod.pod.state import PodState, RuntimePaths
from llmpod.proxy import ProxySettings
from llmpod.tool_calling import needs_tool_parser, refusal_message, serves_tools, tool_args
from tests.proxy.test_app import chat
from tests.support.helpers import SHORT_MODEL, MockControl, ProxyFactory

CATALOG = builtin_catalog()
CAPABLE = tuple(model.id for model in CATALOG.models if model.tool_calling)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    }
]


def spec(model_id: str, max_model_len: int = 32768) -> PodSpec:
    model = CATALOG.model(model_id)
    return PodSpec("llmpod-0123abcd", CATALOG.gpu("NVIDIA RTX A6000"), model, model.id, max_model_len, "key")


# --------------------------------------------------------------------------------------------- vllm serve flags
def test_the_default_config_starts_vllm_with_its_tool_parser() -> None:
    config = PodConfig()
    model = CATALOG.model(config.modelStoreId)

    assert vllm_args(spec(model.id, model.context_length), config) == [
        "--model",
        "Qwen/Qwen2.5-Coder-32B-Instruct-AWQ",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--served-model-name",
        "qwen2.5-coder-32b-instruct-awq",
        "--max-model-len",
        "32768",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]


def test_a_model_without_tool_calling_gets_no_tool_flags() -> None:
    args = vllm_args(spec("deepseek-coder-33b-instruct-awq", 16384), PodConfig(vllm_args=["--enforce-eager"]))

    assert not any(flag in args for flag in ("--enable-auto-tool-choice", "--tool-call-parser", "--chat-template"))
    assert args[-1] == "--enforce-eager"


def test_a_users_parser_replaces_ours_and_no_flag_comes_twice() -> None:
    config = PodConfig(
        modelStoreId="qwen3-coder-30b-a3b-instruct-fp8",
        vllm_args=["--tool-call-parser=qwen3_xml", "--enable-auto-tool-choice"],
    )

    args = vllm_args(spec(config.modelStoreId, 65536), config)

    assert args.count("--enable-auto-tool-choice") == 1
    assert [a for a in args if a.startswith("--tool-call-parser")] == ["--tool-call-parser=qwen3_xml"]
    assert "qwen3_coder" not in args


def test_tool_args_add_a_chat_template_unless_the_user_names_one() -> None:
    assert tool_args("llama3_json", "/t.jinja") == [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "llama3_json",
        "--chat-template",
        "/t.jinja",
    ]
    assert tool_args("llama3_json", "/t.jinja", ["--chat-template", "/mine.jinja"]) == [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "llama3_json",
    ]
    assert tool_args(None, None, ["--tool-call-parser", "hermes"]) == ["--enable-auto-tool-choice"]
    assert tool_args(None, None) == []


def test_whether_the_pod_serves_tools() -> None:
    assert serves_tools("hermes") and serves_tools(None, ["--tool-call-parser", "hermes"])
    assert not serves_tools(None, ["--enable-prefix-caching"])
    deepseek = CATALOG.model("deepseek-coder-33b-instruct-awq")
    assert upstream_tool_calling(deepseek, PodConfig()) is False
    assert upstream_tool_calling(CATALOG.model(PodConfig().modelStoreId), PodConfig()) is True
    # a local command with its own argument template: we cannot know what it does with tools
    assert upstream_tool_calling(deepseek, PodConfig(provider="local", args=["--port", "{port}"])) is None


def test_the_local_mock_gets_the_same_tool_flags_as_a_pod(tmp_path: Path) -> None:
    provider = LocalProvider(PodConfig(provider="local"), tmp_path / "pod.log")

    argv = provider._argv(spec("qwen2.5-coder-7b-instruct"), 4321)

    assert argv[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert "--tool-call-parser" not in provider._argv(spec("codellama-13b-instruct-awq", 8192), 4321)
    custom = LocalProvider(PodConfig(provider="local", args=["--port", "{port}"]), tmp_path / "pod.log")
    assert custom._argv(spec("qwen2.5-coder-7b-instruct"), 4321)[-2:] == ["--port", "4321"]


@pytest.mark.parametrize(
    ("vllm_extra", "parser"),
    [
        (["--tool-call-parser", "qwen3_xml"], "qwen3_xml"),  # the user's parser replaces the catalog's, as on a pod
        (["--enable-auto-tool-choice"], "hermes"),  # the user's switch alone: the catalog's parser still comes along
        (["--tool-call-parser=qwen3_xml", "--enable-prefix-caching"], "qwen3_xml"),
    ],
)
def test_the_local_mock_gets_the_tool_flags_vllm_args_give_a_pod(
    tmp_path: Path, vllm_extra: list[str], parser: str
) -> None:
    # the mock never sees vllm_args: a flag taken from them must not leave it with half of the pair
    config = PodConfig(provider="local", vllm_args=vllm_extra)
    argv = LocalProvider(config, tmp_path / "pod.log")._argv(spec("qwen2.5-coder-7b-instruct"), 4321)

    settings, *_ = parse_mock_argv(argv[3:], {})

    assert settings.enable_auto_tool_choice and settings.tool_call_parser == parser
    assert upstream_tool_calling(CATALOG.model("qwen2.5-coder-7b-instruct"), config) is True


# --------------------------------------------------------------------------------------------- manage_pod -> proxy
def state_for(model_id: str) -> PodState:
    return PodState(
        provider="runpod",
        phase="ready",
        pod_name="llmpod-0123abcd",
        model_id=model_id,
        served_model=model_id,
        vllm_api_key="k",
        created_at=0.0,
        expires_at=1.0,
        idle_timeout_seconds=0,
        proxy_port=8000,
    )


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("qwen2.5-coder-32b-instruct-awq", "1"),
        ("qwen3-coder-30b-a3b-instruct", "1"),
        ("deepseek-coder-33b-instruct-awq", "0"),
        ("codellama-13b-instruct-awq", "0"),
    ],
)
def test_the_proxy_is_told_whether_the_pod_calls_tools(tmp_path: Path, model_id: str, expected: str) -> None:
    sidecars = Sidecars(
        PodConfig(modelStoreId=model_id), tmp_path / "pod_config.json", RuntimePaths(tmp_path), Reporter(), CATALOG
    )

    env = sidecars.tool_env(state_for(model_id))
    settings = ProxySettings.from_env(env)

    assert env["UPSTREAM_TOOL_CALLING"] == expected
    assert settings.upstream_tool_calling is (expected == "1")
    assert settings.tool_capable_models == CAPABLE
    assert "qwen2.5-coder-32b-instruct-awq" in CAPABLE and "deepseek-coder-33b-instruct-awq" not in CAPABLE


def test_an_unknown_model_or_no_catalog_tells_the_proxy_nothing(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path)
    assert Sidecars(PodConfig(), tmp_path / "c.json", paths, Reporter()).tool_env(state_for("x")) == {}
    assert Sidecars(PodConfig(), tmp_path / "c.json", paths, Reporter(), CATALOG).tool_env(state_for("x")) == {}


def test_proxy_settings_read_the_tool_calling_facts() -> None:
    settings = ProxySettings.from_env({"UPSTREAM_TOOL_CALLING": "0", "TOOL_CAPABLE_MODELS": " a, b ,,"})
    assert (settings.upstream_tool_calling, settings.tool_capable_models) == (False, ("a", "b"))
    assert ProxySettings.from_env({}).upstream_tool_calling is None  # unknown: everything is forwarded
    assert ProxySettings.from_env({"UPSTREAM_TOOL_CALLING": ""}).upstream_tool_calling is None
    with pytest.raises(Exception, match="UPSTREAM_TOOL_CALLING='maybe' is not a boolean"):
        ProxySettings.from_env({"UPSTREAM_TOOL_CALLING": "maybe"})


# --------------------------------------------------------------------------------------------- what vLLM refuses
@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ({}, True),
        ({"tool_choice": "auto"}, True),
        ({"tool_choice": "required"}, True),
        ({"tool_choice": {"type": "function", "function": {"name": "read_file"}}}, True),
        ({"tool_choice": "none"}, False),
        ({"tool_choice": None}, False),
    ],
)
def test_which_tool_requests_need_a_parser(extra: dict[str, Any], refused: bool) -> None:
    assert needs_tool_parser({"tools": TOOLS, **extra}) is refused
    assert needs_tool_parser(extra) is False  # no tools: vLLM's own answer (200, or its 400 for a lone tool_choice)
    assert needs_tool_parser({"tools": [], **extra}) is False  # vLLM's own 400 for an empty list


def test_the_refusal_is_one_line_naming_the_models_that_can() -> None:
    message = refusal_message("deepseek-coder-33b-awq", CAPABLE)
    assert "\n" not in message
    assert message.startswith("model deepseek-coder-33b-awq is served without tool calling")
    assert all(model in message for model in CAPABLE) and "modelStoreId" in message


# --------------------------------------------------------------------------------------------- through the proxy
def kilo_turn(**extra: Any) -> dict[str, Any]:
    fields = {
        "tools": TOOLS,
        "tool_choice": "auto",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 100,
        **extra,
    }
    return chat("List the files", **fields)


def test_a_tools_request_for_a_tool_less_pod_is_one_line_400_that_never_reaches_vllm(
    start_proxy: ProxyFactory, mock_control: MockControl
) -> None:
    proxy = start_proxy(upstream_tool_calling=False, tool_capable_models=CAPABLE)
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        for body in (
            kilo_turn(),
            kilo_turn(stream=False),
            {k: v for k, v in kilo_turn().items() if k != "tool_choice"},
            kilo_turn(tool_choice="required"),
        ):
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["type"] == "BadRequestError" and error["param"] == "tools" and error["code"] == 400
            assert error["message"] == refusal_message(SHORT_MODEL, CAPABLE)
            assert "X-Cache" not in response.headers
        # the same model still chats, autocompletes, and takes tools it is told not to call
        assert http.post("/v1/chat/completions", json=chat()).status_code == 200
        assert (
            http.post("/v1/completions", json={"model": SHORT_MODEL, "prompt": "def f", "max_tokens": 5}).status_code
            == 200
        )
        assert http.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice="none")).status_code == 200
        metrics = http.get("/metrics").json()

    assert mock_control.generations() == 3  # none of the refused requests was forwarded
    assert metrics["cache_entries"] <= 3 and metrics["coalesced_requests"] == 0


@pytest.mark.parametrize("tool_calling", [True, None])
def test_a_tools_request_passes_through_when_the_pod_calls_tools_or_nobody_knows(
    start_proxy: ProxyFactory, mock_control: MockControl, tool_calling: bool | None
) -> None:
    proxy = start_proxy(upstream_tool_calling=tool_calling, tool_capable_models=CAPABLE)

    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=kilo_turn(stream=False), timeout=20)

    assert mock_control.generations() == 1  # forwarded: the pod's answer is what the client gets
    assert "served without tool calling" not in response.text


# --------------------------------------------------------------------------------------------- manage_pod --local
def test_local_pod_of_a_tool_less_model_refuses_agent_turns_in_one_line(tmp_path: Path) -> None:
    from tests.support.e2e_harness import MODEL, Workdir, assert_no_survivors

    work = Workdir(tmp_path, None)  # MODEL: DeepSeek Coder 33B, no tool calling in vLLM
    try:
        up = work.run("--local")
        assert up.returncode == 0, up.stderr
        assert "no tool calling: chat, edit and autocomplete only" in up.stdout

        refused = work.chat(tools=TOOLS, stream=True)
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == refusal_message(MODEL, CAPABLE)
        assert work.chat(tools=TOOLS, tool_choice="none").status_code == 200
        assert work.chat().status_code == 200
    finally:
        work.run("--shutdown", timeout=60)
        assert_no_survivors(work)
