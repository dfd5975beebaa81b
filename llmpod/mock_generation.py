"""What the mock vLLM server says: request validation, a toy tokenizer and deterministic answers
(see vllm_fluidmcp.md, A.3 to A.8).

Everything here is pure and synchronous; ``llmpod.mock_shapes`` turns answers into vLLM's JSON and
``llmpod.mock_vllm`` adds HTTP, timing and fault injection.

The tokenizer: a token is a run of word characters or one other non-space character
(``\\w+|[^\\w\\s]``). A completion prompt costs its tokens; a chat prompt costs, per message, the tokens of its
text plus 4 (the template's start, role, separator and end), plus 2 for the assistant generation prompt.
Every generated piece is exactly one token, so ``usage``, ``/tokenize`` and the context check all agree.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

WireFormat = Literal["modern", "legacy"]
_R = TypeVar("_R", bound="_Request")

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default; chat has none
_IM_START, _NEWLINE, _IM_END = 1, 2, 3
_ECHO_TOKENS = 4
_ARGUMENT_PIECE_CHARS = 8
_VOCAB = (
    "amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
    "kestrel", "lagoon", "meadow", "nectar", "obsidian", "prairie", "quartz", "river", "saffron", "tundra",
    "umber", "valley", "willow", "xenon", "yarrow", "zephyr", "anchor", "beacon", "canyon", "dune",
    "estuary", "falcon", "glacier", "heron", "island", "jasper", "kelp", "lantern", "marble", "nimbus",
    "orchid", "pebble", "quill", "reef", "summit",
)
_CHAT_PREFIX = ("Mock", " answer", " to", ":")
_REASONING_PREFIX = ("Thinking", " about", ":")
_COMPLETION_PREFIX = (" Mock", " completion", " of", ":")
_SEED_IGNORED_KEYS = frozenset({"stream", "stream_options", "user"})


class APIError(Exception):
    """A request the server refuses; rendered as vLLM's error body with ``status`` as the HTTP code."""

    def __init__(
        self, status: int, err_type: str, message: str, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None) -> APIError:
    """A 400 ``BadRequestError``, the status vLLM uses for every validation failure."""
    return APIError(400, "BadRequestError", message, param)


def error_body(err: APIError, wire_format: WireFormat) -> dict[str, Any]:
    """vLLM's error JSON: nested since v0.10.1 ("modern"), flat before ("legacy", where param was null)."""
    if wire_format == "legacy":
        return {"object": "error", "message": err.message, "type": err.err_type, "param": None,
                "code": err.status}
    return {"error": {"message": err.message, "type": err.err_type, "param": err.param, "code": err.status}}


# ---------------------------------------------------------------------------------------------- tokens


def tokenize(text: str) -> list[str]:
    """Split text into the mock's tokens."""
    return TOKEN_RE.findall(text)


def token_id(token: str) -> int:
    """A stable id for a token string (ids below 100 are reserved for template tokens)."""
    return 100 + zlib.crc32(token.encode()) % 50_000


def message_text(message: dict[str, Any]) -> str:
    """The text a chat message contributes to the prompt: its text parts and any tool calls it made."""
    content = message.get("content")
    texts = [content] if isinstance(content, str) else [
        part["text"] for part in content or [] if isinstance(part.get("text"), str)
    ]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts += [str(function.get("name", "")), str(function.get("arguments", ""))]
    return "\n".join(texts)


def chat_prompt_ids(messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a chat prompt rendered through a ChatML-like template."""
    ids: list[int] = []
    for message in messages:
        ids += [_IM_START, token_id(str(message.get("role"))), _NEWLINE]
        ids += [token_id(tok) for tok in tokenize(message_text(message))]
        ids.append(_IM_END)
    return [*ids, _IM_START, token_id("assistant")]


def text_ids(text: str) -> list[int]:
    """Token ids of a plain-text prompt."""
    return [token_id(tok) for tok in tokenize(text)]


# ------------------------------------------------------------------------------------------ validation


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
    tool: dict[str, Any] | None = None


def _validate(model: type[_R], body: Any) -> _R:
    if isinstance(body, dict) and body.get("stream_options") and not body.get("stream"):
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise bad_request(f"{where}: {error['msg']}" if where else error["msg"],
                          str(error["loc"][0]) if error["loc"] else None) from None
    # vLLM's SamplingParams checks, with its wording
    for name, value, low in (("n", req.n, 1), ("max_tokens", req.max_tokens, 1),
                             ("max_completion_tokens", getattr(req, "max_completion_tokens", None), 1)):
        if value is not None and value < low:
            raise bad_request(f"{name} must be at least {low}, got {value}.", name)
    if req.temperature is not None and req.temperature < 0:
        raise bad_request(f"temperature must be non-negative, got {req.temperature}.", "temperature")
    return req


def _digest(body: dict[str, Any]) -> bytes:
    canonical = {k: v for k, v in body.items() if k not in _SEED_IGNORED_KEYS}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).digest()


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a chat ``messages`` list (also for ``/tokenize``); the raw dicts are returned."""
    _validate(ChatCompletionRequest, {"messages": messages})
    if not messages:
        raise bad_request("messages: List should have at least 1 item after validation, not 0", "messages")
    return list(messages)


def parse_chat(body: Any) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body."""
    req = _validate(ChatCompletionRequest, body)
    messages = validate_messages(body["messages"])
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    user = [m for m in messages if m["role"] == "user"]
    return ParsedRequest(
        kind="chat", model=req.model, n=req.n or 1, stream=bool(req.stream), digest=_digest(body),
        include_usage=bool((req.stream_options or {}).get("include_usage")),
        prompts=[Prompt(chat_prompt_ids(messages), message_text(user[-1]) if user else "")],
        max_tokens=max_tokens,
        max_tokens_param="max_tokens" if req.max_completion_tokens is None else "max_completion_tokens",
        tool=_pick_tool(body, messages),
    )


def parse_completion(body: Any) -> ParsedRequest:
    """Validate a ``/v1/completions`` body; a list of prompts is a batch, as in vLLM."""
    req = _validate(CompletionRequest, body)
    if req.prompt in (None, "", []):
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    batch = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
    prompts = [Prompt(text_ids(p), p) if isinstance(p, str) else Prompt(list(p), "") for p in batch]
    return ParsedRequest(
        kind="completion", model=req.model, n=req.n or 1, stream=bool(req.stream), digest=_digest(body),
        include_usage=bool((req.stream_options or {}).get("include_usage")),
        prompts=prompts, max_tokens=req.max_tokens, max_tokens_param="max_tokens",
    )


def _pick_tool(body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tool the mock model calls, or None for a text answer (vLLM's tool_choice rules, then a heuristic)."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto" if body.get("tools") else "none")
    if choice in ("none", None):
        return None
    if tools is None:
        raise bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if not tools:
        return None  # "required" with an empty list means "none", as at OpenAI
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        for tool in tools:
            if tool["function"]["name"] == name:
                return dict(tool)
        raise bad_request("The tool specified in `tool_choice` does not match any of the specified `tools`",
                          "tool_choice")
    if choice not in ("auto", "required"):
        raise bad_request(f"Invalid value for `tool_choice`: {choice}! Only named tools, \"none\", \"auto\" or "
                          "\"required\" are supported.", "tool_choice")
    if choice == "auto" and messages[-1]["role"] != "user":
        return None  # after a tool result the model answers in words
    user = [m for m in messages if m["role"] == "user"]
    text = message_text(user[-1]).lower() if user else ""
    for tool in tools:
        if re.search(rf"(?<!\w){re.escape(tool['function']['name'].lower())}(?!\w)", text):
            return dict(tool)
    return dict(tools[0]) if choice == "required" or re.search(r"\b(call|use)\b", text) else None


def check_context(req: ParsedRequest, max_model_len: int) -> None:
    """Refuse prompts that do not fit, with vLLM's current messages."""
    for prompt in req.prompts:
        used = len(prompt.ids)
        if used >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{used} input tokens. Please reduce the length of the input messages.", "input_tokens")
        if req.max_tokens is not None and used + req.max_tokens > max_model_len:
            raise bad_request(
                f"'max_tokens' or 'max_completion_tokens' is too large: {req.max_tokens}. This model's maximum "
                f"context length is {max_model_len} tokens and your request has {used} input tokens "
                f"({req.max_tokens} > {max_model_len} - {used}).", req.max_tokens_param)


# ------------------------------------------------------------------------------------------ generation


@dataclass
class ToolCall:
    """A generated function call; ``arguments`` is a JSON string, as on the wire."""

    id: str
    name: str
    arguments: str

    @property
    def tokens(self) -> int:
        return len(tokenize(self.name)) + len(tokenize(self.arguments))

    def argument_pieces(self) -> list[str]:
        args = self.arguments
        return [args[i:i + _ARGUMENT_PIECE_CHARS] for i in range(0, len(args), _ARGUMENT_PIECE_CHARS)]


@dataclass
class Output:
    """What one choice generated; every piece of ``reasoning`` and ``content`` is one token."""

    index: int
    reasoning: list[str]
    content: list[str]
    tool_call: ToolCall | None
    finish_reason: str

    @property
    def completion_tokens(self) -> int:
        return len(self.reasoning) + len(self.content) + (self.tool_call.tokens if self.tool_call else 0)

    @property
    def steps(self) -> int:
        tool_steps = 1 + len(self.tool_call.argument_pieces()) if self.tool_call else 0
        return len(self.reasoning) + len(self.content) + tool_steps


def _pieces(prefix: tuple[str, ...], quote: str, rng: random.Random, count: int) -> list[str]:
    out = list(prefix[:count])
    for i, match in enumerate(TOKEN_RE.finditer(quote)):
        if len(out) >= count or i >= _ECHO_TOKENS:
            break
        spaced = i == 0 or quote[match.start() - 1].isspace()
        out.append((" " if spaced else "") + match.group())
    while len(out) < count:
        out.append(" " + rng.choice(_VOCAB))
    return out


def _arguments(tool: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    params = tool["function"].get("parameters") or {}
    props = params.get("properties") or {}
    args: dict[str, Any] = {}
    for name in params.get("required") or []:
        schema = props.get(name) or {}
        kind = schema.get("type", "string")
        if schema.get("enum"):
            args[name] = schema["enum"][0]
        elif kind in ("integer", "number"):
            args[name] = rng.randint(1, 100)
        else:
            args[name] = {"boolean": True, "array": [], "object": {}}.get(
                kind, f"{rng.choice(_VOCAB)} {rng.choice(_VOCAB)}")
    return args


def generate(req: ParsedRequest, *, chunk_count: int, reasoning: bool, max_model_len: int) -> list[Output]:
    """The deterministic answer to a request: one Output per choice (prompt-major, then ``n``)."""
    outputs = []
    for p, prompt in enumerate(req.prompts):
        budget = req.max_tokens if req.max_tokens is not None else max_model_len - len(prompt.ids)
        for i in range(req.n):
            index = p * req.n + i
            rng = random.Random(hashlib.sha256(req.digest + str(index).encode()).digest())
            wanted_reasoning = max(1, chunk_count // 2) if reasoning and req.kind == "chat" else 0
            thoughts = _pieces(_REASONING_PREFIX, prompt.quote, rng, min(wanted_reasoning, budget))
            left = budget - len(thoughts)
            call = None
            if req.tool is not None:
                args = json.dumps(_arguments(req.tool, rng), ensure_ascii=False)
                call = ToolCall(f"chatcmpl-tool-{secrets.token_hex(8)}", req.tool["function"]["name"], args)
                if call.tokens > left:
                    call = None  # cut off mid-call: vLLM's parser gives up and returns the raw text
            if call is not None:
                outputs.append(Output(index, thoughts, [], call, "tool_calls"))
                continue
            prefix = _CHAT_PREFIX if req.kind == "chat" else _COMPLETION_PREFIX
            content = _pieces(prefix, prompt.quote, rng, max(0, min(chunk_count, left)))
            # A tool call that did not fit means the model was cut off mid-call.
            truncated = len(thoughts) < wanted_reasoning or len(content) < chunk_count or req.tool is not None
            outputs.append(Output(index, thoughts, content, None, "length" if truncated else "stop"))
    return outputs


# ---------------------------------------------------------------------------------------------- shapes


def usage(req: ParsedRequest, outputs: list[Output], *, stream: bool) -> dict[str, Any]:
    """``UsageInfo`` in vLLM's field order; the stream's usage chunk omits the null details."""
    prompt = sum(len(p.ids) for p in req.prompts)
    completion = sum(o.completion_tokens for o in outputs)
    body: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                            "completion_tokens": completion}
    if not stream:
        body["prompt_tokens_details"] = None
    return body
