"""The requests the fidelity tier sends to vLLM's own server and to the mock, and the servers they go to.

Each server is started twice over: real vLLM 0.33 (``tests/support/real_vllm.py``, only when recording with ``--live``)
with ``vllm_args``, and the mock with ``mock`` settings meant to be the same configuration. The stub engine answers
``stub_tokens`` tokens then EOS, so the mock answers as many (``chunk_count``) and finish reasons agree.

Left out on purpose: a named ``tool_choice`` or ``"required"`` WITH a parser (vLLM answers them through guided
decoding, which the stub engine ignores, so the recording would show the stub, not vLLM), and ``n > 1`` streams
(the stub gives identical choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL = "my-model"
MAX_MODEL_LEN = 1024
STUB_TOKENS = 8
API_KEY = "fidelity-key"  # a made-up key for a loopback server that lives for one recording


@dataclass(frozen=True)
class Server:
    name: str
    vllm_args: list[str]
    mock: dict[str, Any]


_COMMON_ARGS = [
    "--served-model-name",
    MODEL,
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--stub-tokens",
    str(STUB_TOKENS),
    "--stub-delay",
    "0",
]
_COMMON_MOCK: dict[str, Any] = {
    "model": "fidelity/model",
    "served_model_name": MODEL,
    "max_model_len": MAX_MODEL_LEN,
    "chunk_count": STUB_TOKENS,
}

SERVERS = {
    "plain": Server("plain", _COMMON_ARGS, _COMMON_MOCK),
    "tools": Server(
        "tools",
        [*_COMMON_ARGS, "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--stub-tool-calls"],
        {**_COMMON_MOCK, "enable_auto_tool_choice": True, "tool_call_parser": "hermes"},
    ),
    "key": Server("key", [*_COMMON_ARGS, "--api-key", API_KEY], {**_COMMON_MOCK, "api_key": API_KEY}),
}


@dataclass(frozen=True)
class Case:
    name: str
    server: str
    method: str
    path: str
    body: Any = None  # sent as JSON
    raw: bytes | None = None  # sent as is, with content_type
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def request_headers(self) -> dict[str, str]:
        """The headers the corpus sets (httpx adds its own host, accept, user-agent and content-length)."""
        if self.raw is None and self.body is None:
            return dict(self.headers)
        return {**self.headers, "content-type": self.content_type}

    def request(self) -> dict[str, Any]:
        """The request as a golden file records it, so a corpus entry changed without re-recording is caught."""
        out: dict[str, Any] = {
            "server": self.server,
            "method": self.method,
            "path": self.path,
            "headers": self.request_headers(),
        }
        if self.body is not None:
            out["body"] = self.body
        if self.raw is not None:
            out["raw"] = self.raw.decode()
        return out


HELLO = [{"role": "user", "content": "What is the capital of France?"}]
# Far over the limit whatever the tokenizer, so vLLM's message is exact: it tokenizes at most max_model_len + 1
# tokens and then says "contains at least 1025 input tokens" (vllm 0.33.0 vllm/renderers/params.py,
# get_encode_kwargs and _token_len_check); the comparison masks no number in it.
LONG = [{"role": "user", "content": "word " * 1500}]
CALL = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BEARER = {"Authorization": f"Bearer {API_KEY}"}


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HELLO, **extra}


CASES = [
    # --- plain routes
    Case("health", "plain", "GET", "/health"),
    Case("version", "plain", "GET", "/version"),
    Case("models", "plain", "GET", "/v1/models"),
    Case("tokenize_prompt", "plain", "POST", "/tokenize", {"model": MODEL, "prompt": "Hello, world!"}),
    Case("tokenize_messages", "plain", "POST", "/tokenize", {"model": MODEL, "messages": HELLO}),
    Case("tokenize_unknown_model", "plain", "POST", "/tokenize", {"model": "nope", "prompt": "x"}),
    Case("tokenize_missing_prompt", "plain", "POST", "/tokenize", {"model": MODEL}),
    Case("route_not_found", "plain", "GET", "/v1/nope"),
    Case("chat_get_not_allowed", "plain", "GET", CHAT),
    # --- chat answers
    Case("chat_plain", "plain", "POST", CHAT, _chat()),
    Case("chat_no_model_field", "plain", "POST", CHAT, {"messages": HELLO}),
    Case("chat_max_tokens_length", "plain", "POST", CHAT, _chat(max_tokens=3)),
    Case("chat_max_completion_tokens_length", "plain", "POST", CHAT, _chat(max_completion_tokens=3)),
    Case("chat_n2", "plain", "POST", CHAT, _chat(n=2)),
    Case("chat_stream", "plain", "POST", CHAT, _chat(stream=True)),
    Case("chat_stream_usage", "plain", "POST", CHAT, _chat(stream=True, stream_options={"include_usage": True})),
    Case("chat_stream_length", "plain", "POST", CHAT, _chat(stream=True, max_tokens=3)),
    Case("chat_max_tokens_lowered", "plain", "POST", CHAT, _chat(max_tokens=MAX_MODEL_LEN)),
    # --- chat refusals
    Case("chat_max_tokens_too_big", "plain", "POST", CHAT, _chat(max_tokens=MAX_MODEL_LEN + 1)),
    Case("chat_max_completion_tokens_too_big", "plain", "POST", CHAT, _chat(max_completion_tokens=32000)),
    Case("chat_too_long", "plain", "POST", CHAT, _chat(messages=LONG)),
    Case("chat_too_long_stream", "plain", "POST", CHAT, _chat(messages=LONG, stream=True)),
    Case("chat_unknown_model", "plain", "POST", CHAT, _chat(model="nope")),
    Case("chat_bad_json", "plain", "POST", CHAT, raw=b'{"model": "my-model", "messages": [}'),
    Case("chat_not_json_content_type", "plain", "POST", CHAT, raw=b"hello", content_type="text/plain"),
    Case("chat_body_not_object", "plain", "POST", CHAT, [1, 2]),
    Case("chat_max_tokens_not_int", "plain", "POST", CHAT, _chat(max_tokens="many")),
    Case("chat_missing_messages", "plain", "POST", CHAT, {"model": MODEL}),
    Case("chat_empty_messages", "plain", "POST", CHAT, _chat(messages=[])),
    Case("chat_max_tokens_zero", "plain", "POST", CHAT, _chat(max_tokens=0)),
    Case("chat_stream_options_without_stream", "plain", "POST", CHAT, _chat(stream_options={"include_usage": True})),
    # --- tools without a parser
    Case("tools_no_parser_default_choice", "plain", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER])),
    Case("tools_no_parser_auto", "plain", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER], tool_choice="auto")),
    Case("tools_no_parser_none", "plain", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER], tool_choice="none")),
    Case(
        "tools_no_parser_required", "plain", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER], tool_choice="required")
    ),
    Case("tools_no_parser_named", "plain", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER], tool_choice=NAMED)),
    Case("tools_empty_list", "plain", "POST", CHAT, _chat(tools=[])),
    Case("tool_choice_without_tools", "plain", "POST", CHAT, _chat(tool_choice="auto")),
    Case("tool_choice_invalid", "plain", "POST", CHAT, _chat(tools=[WEATHER], tool_choice="sometimes")),
    Case(
        "tool_choice_named_unknown",
        "plain",
        "POST",
        CHAT,
        _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "other"}}),
    ),
    Case(
        "tool_choice_named_no_function",
        "plain",
        "POST",
        CHAT,
        _chat(tools=[WEATHER], tool_choice={"type": "function", "function": "get_weather"}),
    ),
    # --- tools with the hermes parser
    Case("tools_call", "tools", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER], tool_choice="auto")),
    Case("tools_call_default_choice", "tools", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER])),
    Case(
        "tools_call_stream_usage",
        "tools",
        "POST",
        CHAT,
        _chat(messages=CALL, tools=[WEATHER], stream=True, stream_options={"include_usage": True}),
    ),
    Case("tools_call_stream", "tools", "POST", CHAT, _chat(messages=CALL, tools=[WEATHER], stream=True)),
    Case(
        "tools_parser_choice_none_stream",
        "tools",
        "POST",
        CHAT,
        _chat(tools=[WEATHER], tool_choice="none", stream=True),
    ),
    Case("tools_parser_plain_chat", "tools", "POST", CHAT, _chat()),
    Case("tools_parser_plain_stream", "tools", "POST", CHAT, _chat(stream=True)),
    Case("tools_parser_choice_none", "tools", "POST", CHAT, _chat(tools=[WEATHER], tool_choice="none")),
    # --- completions
    Case("completion_plain", "plain", "POST", COMPLETIONS, {"model": MODEL, "prompt": "Once upon a time"}),
    Case(
        "completion_stream_usage",
        "plain",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": "Once upon a time", "stream": True, "stream_options": {"include_usage": True}},
    ),
    Case(
        "completion_stream",
        "plain",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": "Once upon a time", "stream": True},
    ),
    Case(
        "completion_max_tokens_length",
        "plain",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3},
    ),
    Case("completion_n2", "plain", "POST", COMPLETIONS, {"model": MODEL, "prompt": "Once upon a time", "n": 2}),
    Case("completion_unknown_model", "plain", "POST", COMPLETIONS, {"model": "nope", "prompt": "x"}),
    Case(
        "completion_too_long",
        "plain",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": "word " * 1500},
    ),
    Case(
        "completion_max_tokens_too_big",
        "plain",
        "POST",
        COMPLETIONS,
        {"model": MODEL, "prompt": "Hi", "max_tokens": 32000},
    ),
    Case("completion_missing_prompt", "plain", "POST", COMPLETIONS, {"model": MODEL}),
    # --- the API key
    Case("key_models_missing", "key", "GET", "/v1/models"),
    Case("key_models_wrong", "key", "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}),
    Case("key_chat_missing", "key", "POST", CHAT, _chat()),
    Case("key_lowercase_bearer", "key", "GET", "/v1/models", headers={"Authorization": f"bearer {API_KEY}"}),
    Case("key_two_spaces", "key", "GET", "/v1/models", headers={"Authorization": f"Bearer  {API_KEY}"}),
    Case("key_no_scheme", "key", "GET", "/v1/models", headers={"Authorization": API_KEY}),
    Case("key_options_not_guarded", "key", "OPTIONS", "/v1/models"),
    Case("key_models_right", "key", "GET", "/v1/models", headers=BEARER),
    Case("key_chat_right", "key", "POST", CHAT, _chat(), headers=BEARER),
    Case("key_health_open", "key", "GET", "/health"),
    Case("key_version_open", "key", "GET", "/version"),
    Case("key_tokenize_open", "key", "POST", "/tokenize", {"model": MODEL, "prompt": "Hello"}),
    Case("key_metrics_open", "key", "GET", "/metrics"),
]
