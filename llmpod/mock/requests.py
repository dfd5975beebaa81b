"""Request validation and parsing for the mock's generation routes, in vLLM 0.33.0's words (checked against its
wheel: vllm/renderers/params.py, vllm/entrypoints/serve/exception_handling/,
vllm/entrypoints/openai/chat_completion/protocol.py, vllm/renderers/online_renderer.py, vllm/sampling_params.py,
and against its running server: tests/fidelity/golden/).

Owns the pydantic request models, ``ParsedRequest`` and the checks vLLM makes before (``parse_chat``,
``parse_completion``, ``validate_messages``) and after (``check_render``) it looks at the model name. Pure and
synchronous; ``llmpod.mock.generation`` answers a ``ParsedRequest``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmpod.mock import tools as mock_tools
from llmpod.mock.errors import bad_request, request_validation_error, vllm_validation
from llmpod.mock.tokens import chat_prompt_ids, message_text, text_ids

_R = TypeVar("_R", bound="_Request")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default; chat has none
_SEED_IGNORED_KEYS = frozenset({"stream", "stream_options", "user"})


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Function(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class _Tool(BaseModel):
    type: Literal["function"] = "function"
    function: _Function


class _Request(BaseModel):
    """The fields the mock reads, coerced as leniently as vLLM's pydantic request models coerce them."""

    model: str | None = None
    n: int | None = 1
    max_tokens: int | None = None
    temperature: float | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None


class ChatCompletionRequest(_Request):
    """Named as in vLLM, whose name shows up in a validation message."""

    messages: list[_Message]
    max_completion_tokens: int | None = None
    tools: list[_Tool] | None = None


class CompletionRequest(_Request):
    """Named as in vLLM; a list of strings or of token-id lists is a batch of prompts."""

    prompt: list[int] | list[list[int]] | str | list[str] | None = None
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS


@dataclass
class Prompt:
    """One prompt of a request: its token ids, and the text the answer quotes."""

    ids: list[int]
    quote: str


@dataclass
class ParsedRequest:
    """A validated generation request."""

    kind: Literal["chat", "completion"]
    model: str | None
    prompts: list[Prompt]
    n: int
    max_tokens: int | None
    max_tokens_param: str
    stream: bool
    include_usage: bool
    digest: bytes
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    messages: list[dict[str, Any]] | None = None
    tool: dict[str, Any] | None = None  # set by check_render: the tool the answer calls


def _check_tool_usage(body: dict[str, Any]) -> None:
    """ChatCompletionRequest.check_tool_usage (vllm/entrypoints/openai/chat_completion/protocol.py, 0.33.0)."""
    if body.get("tools") == []:
        raise vllm_validation(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.", "tools"
        )
    choice = body.get("tool_choice", "auto" if body.get("tools") else None)
    if choice is None or choice == "none":
        return
    if body.get("tools") is None:
        raise vllm_validation("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise vllm_validation(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" are supported.',
            "tool_choice",
        )
    if isinstance(choice, dict):
        usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
        function = choice.get("function")
        if not isinstance(function, dict):
            raise vllm_validation(
                f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}", "tool_choice.function"
            )
        if "name" not in function:
            raise vllm_validation(
                f"Expected field `name` in `function` in `tool_choice`! {usage}", "tool_choice.function.name"
            )
        name = function["name"]
        if not isinstance(name, str) or not name:
            raise vllm_validation(
                f"Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}", "tool_choice.function.name"
            )
        tools = body["tools"] if isinstance(body["tools"], list) else []
        if not any(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name") == name
            for t in tools
        ):
            raise vllm_validation(
                "The tool specified in `tool_choice` does not match any of the specified `tools`", "tool_choice"
            )


def _validate(model: type[_R], body: Any) -> _R:
    if not isinstance(body, dict):  # what FastAPI says of a JSON body that is not an object
        raise request_validation_error(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "input": body,
                }
            ]
        )
    # vLLM's "before" model validators run ahead of the field checks
    if model is ChatCompletionRequest:
        _check_tool_usage(body)
    if body.get("stream_options") and not body.get("stream"):
        raise vllm_validation("Stream options can only be defined when `stream=True`.", "stream_options")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise request_validation_error([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
    # vLLM's SamplingParams checks, with its wording (vllm/sampling_params.py)
    if req.n is not None and req.n < 1:
        raise vllm_validation(f"n must be at least 1, got {req.n}.")
    for value in (req.max_tokens, getattr(req, "max_completion_tokens", None)):  # both are SamplingParams' max_tokens
        if value is not None and value < 1:
            raise vllm_validation(f"max_tokens must be at least 1, got {value}.", "max_tokens", value)
    if req.temperature is not None and req.temperature < 0:
        raise vllm_validation(
            f"temperature must be non-negative, got {req.temperature}.", "temperature", req.temperature
        )
    return req


def _digest(body: dict[str, Any]) -> bytes:
    canonical = {k: v for k, v in body.items() if k not in _SEED_IGNORED_KEYS}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).digest()


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a chat ``messages`` list (also for ``/tokenize``); the raw dicts are returned."""
    _validate(ChatCompletionRequest, {"messages": messages})
    if not messages:
        raise bad_request("Cannot apply chat template to an empty conversation. Provide at least one message.")
    return list(messages)


def parse_chat(body: Any) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body (the checks vLLM makes before it looks at the model name)."""
    req = _validate(ChatCompletionRequest, body)
    messages = list(body["messages"])
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    user = [m for m in messages if m["role"] == "user"]
    tools = body.get("tools")
    return ParsedRequest(
        kind="chat",
        model=req.model,
        n=req.n or 1,
        stream=bool(req.stream),
        digest=_digest(body),
        include_usage=bool((req.stream_options or {}).get("include_usage")),
        prompts=[Prompt(chat_prompt_ids(messages), message_text(user[-1]) if user else "")],
        max_tokens=max_tokens,
        max_tokens_param="max_tokens" if req.max_completion_tokens is None else "max_completion_tokens",
        tools=tools,
        tool_choice=body.get("tool_choice", "auto" if tools else "none"),
        messages=messages,
    )


def parse_completion(body: Any) -> ParsedRequest:
    """Validate a ``/v1/completions`` body; a list of prompts is a batch, as in vLLM."""
    req = _validate(CompletionRequest, body)
    if req.prompt in (None, "", []):
        raise vllm_validation("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    batch = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
    prompts = [Prompt(text_ids(p), p) if isinstance(p, str) else Prompt(list(p), "") for p in batch]
    return ParsedRequest(
        kind="completion",
        model=req.model,
        n=req.n or 1,
        stream=bool(req.stream),
        digest=_digest(body),
        include_usage=bool((req.stream_options or {}).get("include_usage")),
        prompts=prompts,
        max_tokens=req.max_tokens,
        max_tokens_param="max_tokens",
    )


def check_render(req: ParsedRequest, *, max_model_len: int, tool_parser: str | None) -> None:
    """The checks vLLM 0.33 makes after the model name, in its order: tool calling needs a parser
    (vllm/renderers/online_renderer.py), an empty conversation has no template, ``max_tokens`` may not exceed
    the context and the prompt must fit in it (vllm/renderers/params.py). Picks the tool the answer calls.
    ``tool_parser`` is None unless the server has both --enable-auto-tool-choice and --tool-call-parser."""
    choice = req.tool_choice
    if req.kind == "chat" and tool_parser is None and choice not in (None, "none"):
        if choice == "auto":
            raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        what = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) else f'"{choice}"'
        raise bad_request(f"tool_choice={what} requires --tool-call-parser to be set")
    if req.kind == "chat" and not req.messages:
        raise bad_request("Cannot apply chat template to an empty conversation. Provide at least one message.")
    if req.max_tokens is not None and req.max_tokens > max_model_len:
        raise vllm_validation(
            f"{req.max_tokens_param}={req.max_tokens} cannot be greater than max_model_len="
            f"{max_model_len}. Please request fewer output tokens.",
            req.max_tokens_param,
            req.max_tokens,
        )
    for prompt in req.prompts:
        if len(prompt.ids) > max_model_len:
            # vLLM tokenizes at most max_model_len + 1 tokens, hence "at least" whatever the prompt's length
            raise vllm_validation(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
                f"at least {max_model_len + 1} input tokens, which exceeds this limit even without any output "
                "tokens. Please reduce the length of the input prompt.",
                "input_tokens",
                max_model_len + 1,
            )
        if len(prompt.ids) == max_model_len:  # no room left: get_max_tokens gives 0, which SamplingParams refuses
            raise vllm_validation("max_tokens must be at least 1, got 0.", "max_tokens", 0)
    if tool_parser is not None and req.tools and choice not in (None, "none"):
        user = [m for m in req.messages or [] if m.get("role") == "user"]
        req.tool = mock_tools.pick_tool(req.tools, choice, req.messages or [], message_text(user[-1]) if user else "")
