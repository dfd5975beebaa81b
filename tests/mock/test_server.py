"""The mock vLLM server answers like vLLM's OpenAI-compatible server (vllm_fluidmcp.md, Part A)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from llmpod.mock import MockSettings, create_app
from llmpod.mock import cli as mock_vllm_server
from tests.support.servers import LoopbackServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def client_for(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock", **kwargs)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(MockSettings())) as c:
        yield c


def sse(response: httpx.Response) -> list[Any]:
    """The data events of a stream, JSON-decoded except the final "[DONE]"."""
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    text = response.text
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def tokens_in(client: httpx.AsyncClient, **body: Any) -> int:
    response = await client.post("/tokenize", json=body)
    assert response.status_code == 200
    return int(response.json()["count"])


# ------------------------------------------------------------------------------------------ plain routes


async def test_health_version_and_ping(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    assert (await client.get("/ping")).status_code == 200
    assert (await client.get("/version")).json() == {"version": "0.33.0"}


async def test_models_lists_the_served_name_with_the_model_path_as_root() -> None:
    app = create_app(MockSettings(model="org/big-model", served_model_name="big", max_model_len=2048))
    async with client_for(app) as client:
        body = (await client.get("/v1/models")).json()
        assert body["object"] == "list"
        [card] = body["data"]
        assert {k: card[k] for k in ("id", "object", "owned_by", "root", "parent", "max_model_len")} == {
            "id": "big",
            "object": "model",
            "owned_by": "vllm",
            "root": "org/big-model",
            "parent": None,
            "max_model_len": 2048,
        }
        assert isinstance(card["created"], int)
        [perm] = card["permission"]
        assert perm["object"] == "model_permission" and perm["id"].startswith("modelperm-")
        assert set(perm) == {
            "id",
            "object",
            "created",
            "allow_create_engine",
            "allow_sampling",
            "allow_logprobs",
            "allow_search_indices",
            "allow_view",
            "allow_fine_tuning",
            "organization",
            "group",
            "is_blocking",
        }
        answer = await client.post(CHAT, json={"model": "big", "messages": HELLO})
        assert answer.json()["model"] == "big"
        by_path = await client.post(CHAT, json={"model": "org/big-model", "messages": HELLO})
        assert by_path.status_code == 404


async def test_tokenize_counts_prompts_and_chat_messages(client: httpx.AsyncClient) -> None:
    body = (await client.post("/tokenize", json={"model": "mock-model", "prompt": "Hello, world!"})).json()
    assert body == {"count": 4, "max_model_len": 4096, "tokens": body["tokens"], "token_strs": None}
    assert len(body["tokens"]) == 4 and all(isinstance(t, int) for t in body["tokens"])
    # two messages of 1 and 2 tokens: 3 + 4 per message + 2 for the generation prompt
    chat = [{"role": "system", "content": "Terse"}, {"role": "user", "content": "Hi!"}]
    assert await tokens_in(client, messages=chat) == 13
    assert (await client.post("/tokenize", json={"model": "other", "prompt": "x"})).status_code == 404
    assert (await client.post("/tokenize", json={"model": "mock-model"})).status_code == 400


async def test_metrics_exposes_vllm_series_per_app() -> None:
    busy, idle = create_app(MockSettings()), create_app(MockSettings())
    async with client_for(busy) as client:
        usage = (await client.post(CHAT, json={"messages": HELLO})).json()["usage"]
        response = await client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    text, labels = response.text, 'engine="0",model_name="mock-model"'
    assert f"vllm:prompt_tokens_total{{{labels}}} {usage['prompt_tokens']}.0" in text
    assert f"vllm:generation_tokens_total{{{labels}}} {usage['completion_tokens']}.0" in text
    assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="mock-model"} 1.0' in text
    assert f"vllm:num_requests_running{{{labels}}} 0.0" in text
    assert f"vllm:num_requests_waiting{{{labels}}} 0.0" in text
    assert f"vllm:kv_cache_usage_perc{{{labels}}} 0.0" in text
    async with client_for(idle) as client:
        assert "vllm:request_success_total{" not in (await client.get("/metrics")).text


# --------------------------------------------------------------------------------------------- shapes


async def test_chat_answer_has_every_vllm_field(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"model": "mock-model", "messages": HELLO})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "mock-model"
    assert body["prompt_logprobs"] is None and body["kv_transfer_params"] is None
    assert body["system_fingerprint"].startswith("vllm-0.33.0-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["stop_reason"] is None
    assert choice["finish_reason"] == "stop"
    message = choice["message"]
    # vLLM 0.33 leaves out an empty tool_calls list
    assert message == {
        "role": "assistant",
        "content": message["content"],
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "reasoning": None,
    }
    assert message["content"].startswith("Mock answer to: What is the capital")
    assert list(body["usage"]) == [
        "prompt_tokens",
        "total_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    ]
    assert body["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream_order(client: httpx.AsyncClient, include_usage: bool) -> None:
    request = {"messages": HELLO}
    whole = (await client.post(CHAT, json=request)).json()
    stream = {**request, "stream": True, "stream_options": {"include_usage": include_usage}}
    events = sse(await client.post(CHAT, json=stream))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"] != whole["id"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    if include_usage:
        usage_chunk = chunks.pop()
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == {
            k: whole["usage"][k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")
        }
        assert usage_chunk["system_fingerprint"] == whole["system_fingerprint"]
    content, final = chunks[1:-1], chunks[-1]
    assert all("usage" not in c for c in content)
    assert len(content) == whole["usage"]["completion_tokens"]  # one token per chunk
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["delta"]["content"] for c in content)
    # vLLM 0.33 ends an answer that stopped on its own with a chunk of its own, without a tool parser {"content": ""}
    assert final["choices"] == [
        {
            "index": 0,
            "delta": {"content": ""},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": None,
            "weight_versions": None,
        }
    ]
    assert ("system_fingerprint" in final) is not include_usage
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == whole["choices"][0]["message"]["content"]


async def test_completions_in_both_modes(client: httpx.AsyncClient) -> None:
    request = {"model": "mock-model", "prompt": "Once upon a time"}
    body = (await client.post("/v1/completions", json=request)).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    [choice] = body["choices"]
    assert set(choice) >= {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_logprobs"}
    assert choice["text"].startswith(" Mock completion of: Once upon a time") and choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == await tokens_in(client, prompt=request["prompt"])

    events = sse(
        await client.post(
            "/v1/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
        )
    )
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 12
    chunks = events[:-2]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert chunks[-1]["choices"][0]["text"] == ""


async def test_n_choices_differ_and_each_stream_choice_finishes(client: httpx.AsyncClient) -> None:
    request = {"messages": HELLO, "n": 3}
    whole = (await client.post(CHAT, json=request)).json()
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert whole["usage"]["completion_tokens"] == 36
    chunks = sse(await client.post(CHAT, json={**request, "stream": True}))[:-1]
    for index, text in enumerate(texts):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"]["content"] for c in mine) == text
        assert [c["finish_reason"] for c in mine][-2:] == [None, "stop"] and mine[-1]["delta"] == {"content": ""}


async def test_answers_are_deterministic_and_ids_are_not(client: httpx.AsyncClient) -> None:
    first = (await client.post(CHAT, json={"messages": HELLO, "user": "a"})).json()
    second = (await client.post(CHAT, json={"messages": HELLO, "user": "b"})).json()
    other = (await client.post(CHAT, json={"messages": [{"role": "user", "content": "Tell me a joke"}]})).json()
    assert first["choices"] == second["choices"] and first["id"] != second["id"]
    assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]
    tagged = await client.post(CHAT, json={"messages": HELLO}, headers={"X-Request-Id": "req-42"})
    assert tagged.json()["id"] == "chatcmpl-req-42"
    completion = await client.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "r7"})
    assert completion.json()["id"] == "cmpl-r7"


async def test_token_counts_add_up(client: httpx.AsyncClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *HELLO]
    body = (await client.post(CHAT, json={"messages": messages, "max_tokens": 100})).json()
    usage, content = body["usage"], body["choices"][0]["message"]["content"]
    assert usage["prompt_tokens"] == await tokens_in(client, messages=messages)
    assert usage["completion_tokens"] == await tokens_in(client, prompt=content) == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_caps_the_answer(client: httpx.AsyncClient) -> None:
    capped = (await client.post(CHAT, json={"messages": HELLO, "max_completion_tokens": 5})).json()
    assert capped["choices"][0]["finish_reason"] == "length" and capped["usage"]["completion_tokens"] == 5
    assert await tokens_in(client, prompt=capped["choices"][0]["message"]["content"]) == 5
    await client.post("/mock/config", json={"chunk_count": 20})
    # /v1/completions defaults max_tokens to 16, as vLLM does
    completion = (await client.post("/v1/completions", json={"prompt": "Hi"})).json()
    assert completion["usage"]["completion_tokens"] == 16 and completion["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------------------------- tools, reasoning


TOOLS_ON = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


async def test_tool_call_in_both_modes() -> None:
    request = {"messages": [{"role": "user", "content": "Please call get_weather for Paris"}], "tools": [WEATHER_TOOL]}
    async with client_for(create_app(MockSettings(**TOOLS_ON))) as client:
        body = (await client.post(CHAT, json=request)).json()
        chunks = sse(await client.post(CHAT, json={**request, "stream": True}))[:-1]
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "mock"}  # required fields only

    # as vLLM 0.33's hermes parser streams it: id, type and name first (no arguments key), then fragments
    head = chunks[1]["choices"][0]["delta"]
    assert head == {
        "content": None,
        "tool_calls": [
            {"id": head["tool_calls"][0]["id"], "type": "function", "index": 0, "function": {"name": "get_weather"}}
        ],
    }
    pieces = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[2:-1]]
    assert len(pieces) > 1 and all(set(p) == {"index", "function"} for p in pieces)
    assert "".join(p["function"]["arguments"] for p in pieces) == call["function"]["arguments"]
    final = chunks[-1]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] == "tool_calls"  # {} with a tool parser


async def test_no_tool_call_when_not_asked_for() -> None:
    unasked = {"messages": HELLO, "tools": [WEATHER_TOOL]}
    refused = {
        "messages": [{"role": "user", "content": "use get_weather"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "none",
    }
    answered = {
        "messages": [
            {"role": "user", "content": "use get_weather"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "Sunny"},
        ],
        "tools": [WEATHER_TOOL],
    }
    async with client_for(create_app(MockSettings(**TOOLS_ON))) as client:
        for request in (unasked, refused, answered):
            choice = (await client.post(CHAT, json=request)).json()["choices"][0]
            assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        named = {**unasked, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        choice = (await client.post(CHAT, json=named)).json()["choices"][0]
        # a forced named tool finishes "stop" in vLLM 0.33 (resolve_finish_reason), with content "" not null
        assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"]
        assert choice["message"]["content"] == ""
        required = (await client.post(CHAT, json={**unasked, "tool_choice": "required"})).json()["choices"][0]
        assert required["finish_reason"] == "tool_calls" and required["message"]["content"] == ""


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        (None, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
        ("auto", '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
        ("required", 'tool_choice="required" requires --tool-call-parser to be set'),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            'tool_choice=function "get_weather" requires --tool-call-parser to be set',
        ),
    ],
)
@pytest.mark.parametrize("settings", [{}, {"tool_call_parser": "hermes"}])
async def test_tools_need_both_flags_as_in_vllm(choice: Any, message: str, settings: dict[str, Any]) -> None:
    request: dict[str, Any] = {"messages": HELLO, "tools": [WEATHER_TOOL]}
    if choice is not None:
        request["tool_choice"] = choice
    async with client_for(create_app(MockSettings(**settings))) as client:
        error = nested(await client.post(CHAT, json=request))
        assert error == {"message": message, "type": "BadRequestError", "param": None, "code": 400}
        # "none" needs no parser: the tools are only shown to the model
        plain = await client.post(CHAT, json={**request, "tool_choice": "none"})
        assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] == "stop"


def test_tool_flags_are_checked_as_vllm_checks_them() -> None:
    with pytest.raises(ValueError, match="--enable-auto-tool-choice requires --tool-call-parser"):
        MockSettings(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="invalid tool call parser: nope"):
        MockSettings(enable_auto_tool_choice=True, tool_call_parser="nope")
    settings = mock_vllm_server.parse(
        [
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "qwen3_coder",
            "--chat-template",
            "/x/tool_chat_template.jinja",
        ],
        {},
    )[0]
    assert (settings.enable_auto_tool_choice, settings.tool_call_parser) == (True, "qwen3_coder")
    assert mock_vllm_server.parse(["--tool-call-parser", "hermes"], {})[0].tool_parser is None
    with pytest.raises(mock_vllm_server.UsageError, match=r"^--enable-auto-tool-choice requires --tool-call-parser$"):
        mock_vllm_server.parse(["--enable-auto-tool-choice"], {})


@pytest.mark.parametrize(
    ("wire_format", "key", "absent"),
    [("modern", "reasoning", "reasoning_content"), ("legacy", "reasoning_content", "reasoning")],
)
async def test_reasoning_comes_before_the_content(wire_format: str, key: str, absent: str) -> None:
    async with client_for(create_app(MockSettings(reasoning=True, wire_format=wire_format))) as client:
        message = (await client.post(CHAT, json={"messages": HELLO})).json()["choices"][0]["message"]
        assert message[key].startswith("Thinking about: What") and absent not in message
        assert message["content"].startswith("Mock answer to:")
        chunks = sse(await client.post(CHAT, json={"messages": HELLO, "stream": True}))[1:-1]
        kinds = [next(iter(c["choices"][0]["delta"])) for c in chunks]
        final = [] if wire_format == "legacy" else ["content"]  # 0.33's {"content": ""} finish chunk
        assert kinds == [key] * 6 + ["content"] * 12 + final
        assert "".join(c["choices"][0]["delta"].get(key, "") for c in chunks) == message[key]
        usage = (await client.post(CHAT, json={"messages": HELLO})).json()["usage"]
        assert usage["completion_tokens"] == 18


# --------------------------------------------------------------------------------------------- errors


def nested(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == response.status_code
    return dict(body["error"])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, b"{not json"),
        (CHAT, b"[1, 2]"),
        (CHAT, {"model": "mock-model"}),
        (CHAT, {"messages": []}),
        (CHAT, {"messages": "hello"}),
        (CHAT, {"messages": [{"content": "no role"}]}),
        (CHAT, {"messages": HELLO, "max_tokens": "many"}),
        (CHAT, {"messages": HELLO, "max_tokens": [5]}),
        (CHAT, {"messages": HELLO, "max_tokens": 0}),
        (CHAT, {"messages": HELLO, "n": 1.5}),
        (CHAT, {"messages": HELLO, "temperature": "hot"}),
        (CHAT, {"messages": HELLO, "stream_options": {"include_usage": True}}),
        (CHAT, {"messages": HELLO, "tools": [{"type": "function"}]}),
        (CHAT, {"messages": HELLO, "tool_choice": "required"}),
        ("/v1/completions", {"model": "mock-model"}),
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": {"text": "x"}}),
    ],
)
async def test_bad_requests_are_400(client: httpx.AsyncClient, path: str, body: Any) -> None:
    if isinstance(body, bytes):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = await client.post(path, json=body)
    assert response.status_code == 400
    # vLLM 0.33: its own checks say BadRequestError, FastAPI's body validation (JSON, types) "Bad Request"
    assert nested(response)["type"] in ("BadRequestError", "Bad Request")


async def test_unknown_model_is_404_and_a_missing_model_is_the_served_one(client: httpx.AsyncClient) -> None:
    error = nested(await client.post(CHAT, json={"model": "gpt-4", "messages": HELLO}))
    assert error == {
        "message": "The model `gpt-4` does not exist. Valid aliases: mock-model.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    assert (await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})).status_code == 404
    assert (await client.post(CHAT, json={"messages": HELLO})).json()["model"] == "mock-model"


async def test_context_length_errors_match_vllm() -> None:
    async with client_for(create_app(MockSettings(max_model_len=40))) as client:
        prompt = await tokens_in(client, messages=HELLO)
        # vLLM 0.33 (vllm/renderers/params.py): max_tokens beyond the context is refused...
        assert nested(await client.post(CHAT, json={"messages": HELLO, "max_tokens": 41})) == {
            "message": "max_tokens=41 cannot be greater than max_model_len=40. Please request fewer output tokens. "
            "(parameter=max_tokens, value=41)",
            "type": "BadRequestError",
            "param": "max_tokens",
            "code": 400,
        }
        huge = nested(await client.post(CHAT, json={"messages": HELLO, "max_completion_tokens": 10**20}))
        assert huge["message"].startswith("max_completion_tokens=100000000000000000000 cannot be greater")
        assert huge["param"] == "max_completion_tokens"
        assert (await client.get("/mock/stats")).json()["last_request"]["body"]["max_completion_tokens"] == 10**20
        # ...but a max_tokens that only fails to fit beside the prompt is lowered to what is left
        await client.post("/mock/config", json={"chunk_count": 100})
        lowered = (await client.post(CHAT, json={"messages": HELLO, "max_tokens": 40})).json()
        assert lowered["usage"]["total_tokens"] == 40 and lowered["choices"][0]["finish_reason"] == "length"
        # without max_tokens the answer gets what is left of the window too
        rest = (await client.post(CHAT, json={"messages": HELLO})).json()
        assert rest["usage"]["total_tokens"] == 40 and rest["choices"][0]["finish_reason"] == "length"
        assert prompt < 40
        # a prompt that fills the window leaves max_tokens 0, which vLLM's SamplingParams refuses
        full = [
            {
                "role": "user",
                "content": "word " * (40 - await tokens_in(client, messages=[{"role": "user", "content": ""}])),
            }
        ]
        assert await tokens_in(client, messages=full) == 40
        assert nested(await client.post(CHAT, json={"messages": full}))["message"] == (
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
        )
        # a prompt beyond the window: vLLM tokenizes max_model_len + 1 tokens, so "at least 41"
        long_messages = [{"role": "user", "content": "word " * 40}]
        assert nested(await client.post(CHAT, json={"messages": long_messages})) == {
            "message": "This model's maximum context length is 40 tokens. However, your prompt contains at least 41 "
            "input tokens, which exceeds this limit even without any output tokens. Please reduce the "
            "length of the input prompt. (parameter=input_tokens, value=41)",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }


async def test_legacy_errors_are_flat() -> None:
    async with client_for(create_app(MockSettings(wire_format="legacy"))) as client:
        response = await client.post(CHAT, json={"model": "nope", "messages": HELLO})
    assert response.status_code == 404
    assert response.json() == {
        "object": "error",
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


async def test_api_key_guards_only_v1() -> None:
    async with client_for(create_app(MockSettings(api_key="s3cret"))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", CHAT)):
                response = await client.request(method, path, headers=headers, json={"messages": HELLO})
                assert (response.status_code, response.content) == (401, b'{"error":"Unauthorized"}')
        for scheme in ("Bearer", "bearer"):
            ok = await client.post(CHAT, json={"messages": HELLO}, headers={"Authorization": f"{scheme} s3cret"})
            assert ok.status_code == 200
        for path in ("/health", "/version", "/metrics", "/mock/stats"):
            assert (await client.get(path)).status_code == 200
        assert (await client.post("/tokenize", json={"prompt": "x"})).status_code == 200


async def test_injected_errors() -> None:
    async with client_for(create_app(MockSettings(error_rate=1.0))) as client:
        failed = await client.post(CHAT, json={"messages": HELLO, "stream": True})
        assert failed.status_code == 500 and nested(failed)["type"] == "InternalServerError"
        await client.post("/mock/config", json={"error_rate": 0, "rate_limit_rate": 1.0, "retry_after": 3})
        limited = await client.post("/v1/completions", json={"prompt": "x"})
        assert limited.status_code == 429 and limited.headers["retry-after"] == "3"
        assert nested(limited)["type"] == "RateLimitError"
        injected = (await client.get("/mock/stats")).json()["injected"]
        assert injected == {
            "500": 1,
            "429": 1,
            "cut": 0,
            "invalid_json": 0,
            "malformed_sse": 0,
            "no_done": 0,
            "stall": 0,
        }


async def test_injected_errors_follow_the_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        app = create_app(MockSettings(error_rate=0.3, rate_limit_rate=0.3, seed=seed))
        async with client_for(app) as client:
            return [(await client.post(CHAT, json={"messages": HELLO})).status_code for _ in range(30)]

    first = await statuses(7)
    assert first == await statuses(7) and {200, 429, 500} <= set(first)
    assert first != await statuses(8)


def blocks(response: httpx.Response) -> list[str]:
    """A stream's events as sent, separated by blank lines, without parsing them."""
    return [block for block in response.text.split("\n\n") if block]


def parses(block: str) -> bool:
    data = block.removeprefix("data: ")
    if data == "[DONE]":
        return True
    try:
        json.loads(data)
    except json.JSONDecodeError:
        return False
    return "\n" not in data


@pytest.mark.parametrize("fault", ["invalid_json", "malformed_sse", "no_done"])
async def test_stream_faults_break_a_stream_after_n_events(fault: str) -> None:
    settings = MockSettings(stream_fault=fault, stream_fault_after=2, chunk_count=6)
    async with client_for(create_app(settings)) as client:
        broken = blocks(await client.post(CHAT, json={"messages": HELLO, "stream": True}))
        plain = await client.post(CHAT, json={"messages": HELLO})
        await client.post("/mock/config", json={"stream_fault_rate": 0})
        whole = blocks(await client.post(CHAT, json={"messages": HELLO, "stream": True}))
        stats = (await client.get("/mock/stats")).json()
    # role, 6 tokens, the finish chunk, [DONE]
    assert len(whole) == 9 and all(map(parses, whole)) and whole[-1] == "data: [DONE]"
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"]  # plain answers are whole
    if fault == "no_done":
        assert len(broken) == 2 and all(map(parses, broken))
    elif fault == "invalid_json":
        assert len(broken) == 9 and [parses(b) for b in broken] == [True, True, False] + [True] * 6
        assert broken[-1] == "data: [DONE]"
    else:  # the third event runs into the fourth: one event with two data lines
        assert len(broken) == 8 and not parses(broken[2]) and broken[2].count("data: ") == 2
        assert broken[-1] == "data: [DONE]"
    assert stats["injected"][fault] == 1 and stats["in_flight"] == 0


async def test_a_stalled_stream_goes_quiet_and_frees_its_slot_when_the_client_leaves() -> None:
    app = create_app(MockSettings(stream_fault="stall", stream_fault_after=3))
    with LoopbackServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            received: list[str] = []
            with pytest.raises(httpx.ReadTimeout):
                async with client.stream(
                    "POST", CHAT, json={"messages": HELLO, "stream": True}, timeout=httpx.Timeout(5, read=0.5)
                ) as response:
                    async for line in response.aiter_lines():
                        if line:
                            received.append(line)
            assert len(received) == 3 and all(parses(line) for line in received)
            deadline = time.monotonic() + 5
            while (await client.get("/mock/stats")).json()["in_flight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            stats = (await client.get("/mock/stats")).json()
    assert stats["in_flight"] == 0 and stats["injected"]["stall"] == 1


async def test_stream_fault_rate_breaks_some_streams_by_the_seed() -> None:
    async def broken(seed: int) -> list[bool]:
        app = create_app(MockSettings(stream_fault="no_done", stream_fault_rate=0.5, seed=seed))
        async with client_for(app) as client:
            return [
                blocks(await client.post(CHAT, json={"messages": HELLO, "stream": True}))[-1] != "data: [DONE]"
                for _ in range(20)
            ]

    first = await broken(3)
    assert first == await broken(3) and 0 < sum(first) < 20


def test_stream_fault_flags_and_environment() -> None:
    settings = mock_vllm_server.parse(
        ["--stream-fault", "stall", "--stream-fault-after", "5"], {"MOCK_STREAM_FAULT_RATE": "0.25"}
    )[0]
    assert (settings.stream_fault, settings.stream_fault_after, settings.stream_fault_rate) == ("stall", 5, 0.25)
    with pytest.raises(mock_vllm_server.UsageError, match="--stream-fault"):
        mock_vllm_server.parse(["--stream-fault", "sometimes"], {})


async def test_dead_engine() -> None:
    async with client_for(create_app(MockSettings())) as client:
        await client.post("/mock/config", json={"dead": True})
        health = await client.get("/health")
        assert (health.status_code, health.content) == (503, b"")
        assert nested(await client.post(CHAT, json={"messages": HELLO}))["code"] == 500
        await client.post("/mock/config", json={"dead": False})
        assert (await client.get("/health")).status_code == 200


# ------------------------------------------------------------------------------------ cuts, live state


async def test_die_after_chunks_cuts_the_connection() -> None:
    app = create_app(MockSettings(die_after_chunks=3))
    with LoopbackServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            received: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("POST", CHAT, json={"messages": HELLO, "stream": True}) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            received.append(line)
            assert len(received) == 3 and "[DONE]" not in received[-1]
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(CHAT, json={"messages": HELLO})
            stats = (await client.get("/mock/stats")).json()
    assert stats["injected"]["cut"] == 2 and stats["in_flight"] == 0


async def test_a_client_leaving_mid_stream_frees_its_slot() -> None:
    app = create_app(MockSettings(chunk_delay=0.05, chunk_count=200))  # 10 s if nobody stopped it
    with LoopbackServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            async with client.stream("POST", CHAT, json={"messages": HELLO, "stream": True}) as response:
                chunks = response.aiter_bytes()  # held, so that the connection stays open until we leave
                await chunks.__anext__()
                assert (await client.get("/mock/stats")).json()["in_flight"] == 1
            deadline = time.monotonic() + 3
            while (await client.get("/mock/stats")).json()["in_flight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert (await client.get("/mock/stats")).json()["in_flight"] == 0
            # a plain request is abandoned too (vLLM aborts it), not generated to the end
            await client.post("/mock/config", json={"first_token_delay": 10})
            with pytest.raises(httpx.ReadTimeout):
                await client.post(CHAT, json={"messages": HELLO}, timeout=0.3)
            deadline = time.monotonic() + 3
            while (await client.get("/mock/stats")).json()["in_flight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert (await client.get("/mock/stats")).json()["in_flight"] == 0
            metrics = (await client.get("/metrics")).text
    assert 'finished_reason="abort",model_name="mock-model"} 2.0' in metrics


async def test_die_after_chunks_in_process_raises_like_a_cut() -> None:
    async with client_for(create_app(MockSettings(die_after_chunks=0))) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/completions", json={"prompt": "x", "stream": True})


async def test_stats_config_and_reset(client: httpx.AsyncClient) -> None:
    await client.post(CHAT, json={"messages": HELLO, "stream": True})
    await client.post(CHAT, json={"model": "nope", "messages": HELLO})
    await client.post("/v1/completions", json={"prompt": "x"})
    await client.get("/v1/models")
    await client.get("/health")
    await client.post("/tokenize", json={"prompt": "x"})
    stats = (await client.get("/mock/stats")).json()
    assert {k: stats["requests"][k] for k in ("chat.completions", "completions", "models", "health", "tokenize")} == {
        "chat.completions": 2,
        "completions": 1,
        "models": 1,
        "health": 1,
        "tokenize": 1,
    }
    assert stats["streams"] == 1 and stats["errors"] == {"404": 1} and stats["in_flight"] == 0
    assert stats["last_request"]["body"] == {"prompt": "x"}

    effective = (
        await client.post("/mock/config", json={"chunk_count": 3, "served_model_name": "renamed", "api_key": "k"})
    ).json()
    assert effective["chunk_count"] == 3 and effective["api_key"] == "**********"
    assert effective["model"] == "mock-model" and effective["first_token_delay"] == 0
    auth = {"Authorization": "Bearer k"}
    assert (await client.get("/v1/models", headers=auth)).json()["data"][0]["id"] == "renamed"
    answer = (await client.post(CHAT, json={"messages": HELLO}, headers=auth)).json()
    assert answer["usage"]["completion_tokens"] == 3 and answer["model"] == "renamed"
    for bad in ({"chunk_count": 0}, {"no_such_setting": 1}, {"wire_format": "ancient"}):
        assert (await client.post("/mock/config", json=bad)).status_code == 400
    half = await client.post("/mock/config", json={"enable_auto_tool_choice": True})
    assert nested(half)["message"] == "Error: --enable-auto-tool-choice requires --tool-call-parser"
    both = await client.post("/mock/config", json={"enable_auto_tool_choice": True, "tool_call_parser": "hermes"})
    assert both.json()["tool_call_parser"] == "hermes"

    zeroed = (await client.post("/mock/reset")).json()
    assert set(zeroed["requests"].values()) == {0} and zeroed["streams"] == 0 and zeroed["errors"] == {}


async def test_delays_do_not_block_other_requests() -> None:
    async with client_for(create_app(MockSettings(first_token_delay=0.3))) as client:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(client.post(CHAT, json={"messages": HELLO, "stream": i % 2 == 0}) for i in range(10))
        )
        elapsed = time.monotonic() - started
        assert [a.status_code for a in answers] == [200] * 10
        assert 0.3 <= elapsed < 2.0
        stats = (await client.get("/mock/stats")).json()
        assert stats["max_in_flight"] == 10 and stats["in_flight"] == 0


async def test_openai_sdk_reads_both_modes() -> None:
    with LoopbackServer(create_app(MockSettings(api_key="k", chunk_delay=0.001))) as server:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        try:
            answer = await client.chat.completions.create(model="mock-model", messages=HELLO)  # type: ignore[arg-type]
            assert answer.choices[0].message.content and answer.usage and answer.usage.completion_tokens == 12
            stream = await client.chat.completions.create(
                model="mock-model",
                messages=HELLO,
                stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )
            parts, usage = [], None
            async for chunk in stream:
                parts += [c.delta.content or "" for c in chunk.choices]
                usage = chunk.usage or usage
            assert "".join(parts) == answer.choices[0].message.content
            assert usage is not None and usage.total_tokens == answer.usage.total_tokens
            completion = await client.completions.create(model="mock-model", prompt="Hi")
            assert completion.choices[0].text.startswith(" Mock completion")
        finally:
            await client.close()


# --------------------------------------------------------------------------------------- entry script


def test_flags_win_over_environment() -> None:
    env = {
        "MODEL_NAME": "from-env",
        "VLLM_API_KEY": "env-key",
        "MOCK_CHUNK_DELAY": "0.5",
        "PORT": "9000",
        "MOCK_REASONING": "1",
    }
    settings, host, port, slow = mock_vllm_server.parse(["--model", "flag-model", "--api-key", "flag-key"], env)
    assert (settings.model, settings.chunk_delay, settings.reasoning, host, port, slow) == (
        "flag-model",
        0.5,
        True,
        "127.0.0.1",
        9000,
        0.0,
    )
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "flag-key"
    # a pod's `vllm serve` options are accepted (and ignored), so the same command line runs locally
    pod_flags = [
        "--model",
        "m",
        "--quantization",
        "awq",
        "--gpu-memory-utilization",
        "0.95",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--max-model-len",
        "8192",
    ]
    assert mock_vllm_server.parse(pod_flags, {})[0].max_model_len == 8192
    with pytest.raises(mock_vllm_server.UsageError, match="unrecognized"):
        mock_vllm_server.parse(["--chunk-dela", "1"], {})


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


def test_slow_start_refuses_connections_then_serves(tmp_path: Path) -> None:
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "MOCK_CHUNK_COUNT": "3", "VLLM_API_KEY": "env-key"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "mock_vllm_server.py"), "--port", str(port), "--model", "m", "--slow-start", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.3)
        assert proc.poll() is None and _refused(port)
        wait_for_port(port, timeout=10)
        assert time.monotonic() - started >= 1.0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").status_code == 401
            answer = client.post(
                CHAT, json={"model": "m", "messages": HELLO}, headers={"Authorization": "Bearer env-key"}
            ).json()
            assert answer["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert f"http://127.0.0.1:{port}" in stderr and "env-key" not in stderr


def test_bad_flag_value_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "mock_vllm_server.py"), "--chunk-delay", "-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--chunk-delay" in result.stderr
