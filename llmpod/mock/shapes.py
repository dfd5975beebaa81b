"""The exact JSON vLLM's OpenAI-compatible server sends for the mock's answers: non-streaming bodies with every
field present, and stream chunks grouped by generation step.

``modern`` is vLLM 0.33.0 as recorded from its own server (tests/fidelity/golden/; the fields come from
vllm/entrypoints/openai/chat_completion/serving.py and completion/serving.py, serialized with
``exclude_unset`` in streams); ``legacy`` is v0.10.0 and older (``reasoning_content``, ``tool_calls: []``,
no fingerprint), for the tests of older servers.
"""

from __future__ import annotations

import hashlib
from typing import Any

from llmpod.mock.errors import WireFormat
from llmpod.mock.generation import Output
from llmpod.mock.requests import ParsedRequest

VLLM_VERSION = "0.33.0"


def system_fingerprint(model: str, max_model_len: int) -> str:
    """``vllm-<version>-<hash8>`` (vllm/entrypoints/serve/utils/fingerprint.py); vLLM hashes its engine config,
    the mock what it has of one."""
    return f"vllm-{VLLM_VERSION}-{hashlib.sha256(f'{model}|{max_model_len}'.encode()).hexdigest()[:8]}"


def usage(req: ParsedRequest, outputs: list[Output], *, stream: bool, wire_format: WireFormat) -> dict[str, Any]:
    """``UsageInfo`` in vLLM's field order; the stream's usage chunk omits the null details."""
    prompt = sum(len(p.ids) for p in req.prompts)
    completion = sum(o.completion_tokens for o in outputs)
    body: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if not stream:
        body["prompt_tokens_details"] = None
        if wire_format == "modern":
            body["completion_tokens_details"] = None
    return body


def _reasoning_key(wire_format: WireFormat) -> str:
    return "reasoning" if wire_format == "modern" else "reasoning_content"


def _message(out: Output, wire_format: WireFormat) -> dict[str, Any]:
    if out.content:
        content: str | None = "".join(out.content)
    elif out.forced_tool:
        content = ""  # vllm/entrypoints/openai/chat_completion/message_assembly.py: `content or ""`
    else:
        content = None if out.tool_call or out.reasoning else ""
    call = out.tool_call
    calls = (
        [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]
        if call
        else []
    )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
    }
    if calls or wire_format == "legacy":  # 0.33's ChatMessage drops an empty tool_calls list when serialized
        message["tool_calls"] = calls
    message[_reasoning_key(wire_format)] = "".join(out.reasoning) or None
    return message


def response_body(
    req: ParsedRequest,
    outputs: list[Output],
    *,
    response_id: str,
    created: int,
    model: str,
    wire_format: WireFormat,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A non-streaming response, every field present as in vLLM's ``model_dump()``."""
    modern = wire_format == "modern"
    extra_choice = {"routed_experts": None, "weight_versions": None} if modern else {}
    tail: dict[str, Any] = {"ec_transfer_params": None, "metrics": None} if modern else {}
    head = {
        "id": response_id,
        "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": model,
    }
    common = {
        "service_tier": None,
        "system_fingerprint": fingerprint if modern else None,
        "usage": usage(req, outputs, stream=False, wire_format=wire_format),
    }
    if req.kind == "chat":
        return {
            **head,
            "choices": [
                {
                    "index": o.index,
                    "message": _message(o, wire_format),
                    "logprobs": None,
                    "finish_reason": o.finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    **extra_choice,
                }
                for o in outputs
            ],
            **common,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            **({"prompt_text": None} if modern else {}),
            "kv_transfer_params": None,
            **tail,
        }
    return {
        **head,
        "choices": [
            {
                "index": o.index,
                "text": "".join(o.content),
                "logprobs": None,
                "finish_reason": o.finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                **extra_choice,
            }
            for o in outputs
        ],
        **common,
        "kv_transfer_params": None,
        **tail,
    }


def _tool_deltas(out: Output, modern: bool) -> list[dict[str, Any]]:
    """How vLLM 0.33's hermes parser streams a call (vllm/tool_parsers/hermes_tool_parser.py): the id, type and
    name first (no ``arguments`` key), then argument fragments; ``content`` is null beside them."""
    assert out.tool_call is not None
    call = out.tool_call
    if not modern:
        return [
            {
                "tool_calls": [
                    {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
                ]
            },
            *({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in call.argument_pieces()),
        ]
    return [
        {
            "content": None,
            "tool_calls": [{"id": call.id, "type": "function", "index": 0, "function": {"name": call.name}}],
        },
        *(
            {"content": None, "tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            for piece in call.argument_pieces()
        ),
    ]


def _choice_deltas(out: Output, req: ParsedRequest, wire_format: WireFormat, parser: bool) -> list[dict[str, Any]]:
    """One choice's stream entries, one per generation step, the last one carrying the finish reason.

    vLLM 0.33 ends an answer that stopped on its own (``stop``, ``tool_calls``) with a step of its own for the
    end-of-sequence token: ``delta`` ``{}`` when a tool parser is configured, ``{"content": ""}`` without one
    (``text: ""`` for completions). An answer cut by ``length`` finishes on its last token."""
    modern = wire_format == "modern"
    ends_alone = modern and out.finish_reason != "length"
    if req.kind == "completion":
        extra = {"prompt_token_ids": None, "token_ids": None, "weight_versions": None} if modern else {}
        pieces = [*out.content, ""] if ends_alone else (out.content or [""])
        choices: list[dict[str, Any]] = [
            {"index": out.index, "text": piece, "logprobs": None, "finish_reason": None, "stop_reason": None, **extra}
            for piece in pieces
        ]
        choices[-1]["finish_reason"] = out.finish_reason
        return choices
    key = _reasoning_key(wire_format)
    deltas: list[dict[str, Any]] = [{key: piece} for piece in out.reasoning]
    deltas += [{"content": piece} for piece in out.content]
    if out.tool_call:
        deltas += _tool_deltas(out, modern)
    if ends_alone:
        deltas.append({} if parser else {"content": ""})
    token_ids: dict[str, Any] = {"token_ids": None} if modern else {}
    choices = [
        {"index": out.index, "delta": delta, "logprobs": None, "finish_reason": None, **token_ids}
        for delta in deltas or [{}]
    ]
    choices[-1].update(finish_reason=out.finish_reason, stop_reason=None)
    if modern:
        choices[-1]["weight_versions"] = None
    return choices


def stream_chunks(
    req: ParsedRequest,
    outputs: list[Output],
    *,
    response_id: str,
    created: int,
    model: str,
    wire_format: WireFormat,
    fingerprint: str | None = None,
    parser: bool = False,
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """A stream's chunks grouped by generation step (the server waits before each step), and the tail.

    Step 0 carries every choice's role chunk (chat only) and first token, as vLLM sends both after prefill;
    each later step one more token of every unfinished choice; the last entry of a choice carries its
    ``finish_reason`` (and, without a usage chunk to follow, the ``system_fingerprint``). The tail is the
    usage chunk, when ``stream_options.include_usage`` asked for it.
    """
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    modern = wire_format == "modern"

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": response_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if modern:
            if choice["finish_reason"] is not None and not req.include_usage:
                body["system_fingerprint"] = fingerprint
            body["kv_transfer_params"] = None
        return body

    per_choice = [_choice_deltas(o, req, wire_format, parser) for o in outputs]
    steps: list[list[dict[str, Any]]] = []
    for step in range(max(len(c) for c in per_choice)):
        events = []
        if step == 0 and req.kind == "chat":
            first = {"prompt_token_ids": None, "prompt_text": None} if modern else {}
            events = [
                {
                    "id": response_id,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": o.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    **first,
                }
                for o in outputs
            ]
        steps.append(events + [chunk(c[step]) for c in per_choice if step < len(c)])
    tail = []
    if req.include_usage:
        last: dict[str, Any] = {
            "id": response_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(req, outputs, stream=True, wire_format=wire_format),
        }
        if modern:
            last["system_fingerprint"] = fingerprint
        tail.append(last)
    return steps, tail
