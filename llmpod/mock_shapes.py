"""The exact JSON vLLM's OpenAI-compatible server sends for the mock's answers (vllm_fluidmcp.md A.3 to A.5):
non-streaming bodies with every field present, and stream chunks grouped by generation step."""

from __future__ import annotations

from typing import Any

from llmpod.mock_generation import Output, ParsedRequest, WireFormat, usage


def _reasoning_key(wire_format: WireFormat) -> str:
    return "reasoning" if wire_format == "modern" else "reasoning_content"


def _message(out: Output, wire_format: WireFormat) -> dict[str, Any]:
    if out.content:
        content: str | None = "".join(out.content)
    else:
        content = None if out.tool_call or out.reasoning else ""
    call = out.tool_call
    return {
        "role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
        "function_call": None,
        "tool_calls": [{"id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments}}] if call else [],
        _reasoning_key(wire_format): "".join(out.reasoning) or None,
    }


def response_body(
    req: ParsedRequest, outputs: list[Output], *, response_id: str, created: int, model: str,
    wire_format: WireFormat,
) -> dict[str, Any]:
    """A non-streaming response, every field present as in vLLM's ``model_dump()``."""
    if req.kind == "chat":
        return {
            "id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": o.index, "message": _message(o, wire_format), "logprobs": None,
                         "finish_reason": o.finish_reason, "stop_reason": None, "token_ids": None}
                        for o in outputs],
            "service_tier": None, "system_fingerprint": None, "usage": usage(req, outputs, stream=False),
            "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
        }
    return {
        "id": response_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": o.index, "text": "".join(o.content), "logprobs": None,
                     "finish_reason": o.finish_reason, "stop_reason": None, "token_ids": None,
                     "prompt_logprobs": None, "prompt_token_ids": None} for o in outputs],
        "service_tier": None, "system_fingerprint": None, "usage": usage(req, outputs, stream=False),
        "kv_transfer_params": None,
    }


def _choice_deltas(out: Output, kind: str, wire_format: WireFormat) -> list[dict[str, Any]]:
    if kind == "completion":
        choices = [{"index": out.index, "text": piece, "logprobs": None, "finish_reason": None,
                    "stop_reason": None} for piece in out.content or [""]]
        choices[-1]["finish_reason"] = out.finish_reason
        return choices
    key = _reasoning_key(wire_format)
    deltas: list[dict[str, Any]] = [{key: piece} for piece in out.reasoning]
    deltas += [{"content": piece} for piece in out.content]
    if out.tool_call:
        call = out.tool_call
        deltas.append({"tool_calls": [{"index": 0, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]})
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                   for piece in call.argument_pieces()]
    choices = [{"index": out.index, "delta": delta, "logprobs": None, "finish_reason": None}
               for delta in deltas or [{}]]
    choices[-1].update(finish_reason=out.finish_reason, stop_reason=None)
    return choices


def stream_chunks(
    req: ParsedRequest, outputs: list[Output], *, response_id: str, created: int, model: str,
    wire_format: WireFormat,
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """A stream's chunks grouped by generation step (the server waits before each step), and the tail.

    Step 0 carries every choice's role chunk (chat only) and first token, as vLLM sends both after prefill;
    each later step one more token of every unfinished choice; the last token of a choice carries its
    ``finish_reason``. The tail is the usage chunk, when ``stream_options.include_usage`` asked for it.
    """
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": response_id, "object": obj, "created": created, "model": model, "choices": [choice]}

    per_choice = [_choice_deltas(o, req.kind, wire_format) for o in outputs]
    steps: list[list[dict[str, Any]]] = []
    for step in range(max(len(c) for c in per_choice)):
        events = []
        if step == 0 and req.kind == "chat":
            events = [chunk({"index": o.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for o in outputs]
        steps.append(events + [chunk(c[step]) for c in per_choice if step < len(c)])
    tail = []
    if req.include_usage:
        tail.append({"id": response_id, "object": obj, "created": created, "model": model, "choices": [],
                     "usage": usage(req, outputs, stream=True)})
    return steps, tail
