"""Send a corpus case to a server and reduce the answer to what must match between vLLM and the mock.

What is ignored, and why (everything else must be equal: status codes, the recorded headers, every key and its
order-insensitive presence, value types, nulls, error types, messages and params, finish reasons, delta shapes):
- ids and ``created``: random and time; ids keep their prefix (``chatcmpl-``, ``cmpl-``, ``chatcmpl-tool-``,
  ``modelperm-``) and the tool call id's length.
- generated text (``content``, ``text``, ``reasoning`` and tool call ``arguments``, whole or streamed): the stub
  engine answers hash words, the mock echoes the prompt. Empty strings are NOT masked (the final chunk's
  ``{"content": ""}`` is a shape). Arguments must still be a JSON object: whole ones as they are, streamed ones
  once their pieces are joined per choice and tool call index (``streamed arguments`` in the normalized answer).
- token counts (``/tokenize`` ids and count, the values of ``usage`` numbers): the stub's tokenizer is not the
  mock's. What does not depend on it is kept: every usage key and nested shape (``prompt_tokens_details``: null
  or an object), which counts are 0 and which above, and ``total_tokens == prompt_tokens + completion_tokens``.
  Numbers in error messages are NOT masked: vLLM states them exactly (see ``LONG`` in corpus.py).
- how many text pieces a stream has (it depends on the tokenizer too): consecutive events that are equal once text
  is masked count as one, but only pieces: events with no ``usage`` whose choices all have a null
  ``finish_reason`` and a delta with no ``role`` and no tool call header (id, type, name). A repeated first, finish
  or usage chunk is a difference.
- ``root`` in ``/v1/models``: the model path (the stub's local folder there, a name here).
- the hash in ``system_fingerprint`` (``vllm-0.33.0-<hash8>``): vLLM hashes its whole engine config
  (``vllm/entrypoints/serve/utils/fingerprint.py``); the version before it must match.
- the ``/metrics`` body: vLLM exports hundreds of series, the mock the few the proxy reads.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from tests.fidelity.corpus import Case

RECORDED_HEADERS = ("content-type", "retry-after", "www-authenticate", "allow")
_TEXT_KEYS = frozenset({"content", "text", "reasoning", "reasoning_content"})
_ID_RE = re.compile(r"^(chatcmpl-tool-|chatcmpl-|cmpl-|modelperm-)(.*)$")


async def capture(client: httpx.AsyncClient, case: Case) -> dict[str, Any]:
    """The answer to ``case`` as a golden file stores it: status, recorded headers, JSON body or SSE events."""
    content = case.raw if case.raw is not None else None if case.body is None else json.dumps(case.body).encode()
    response = await client.request(case.method, case.path, content=content, headers=case.request_headers())
    out: dict[str, Any] = {
        "status": response.status_code,
        "headers": {k: response.headers[k] for k in RECORDED_HEADERS if k in response.headers},
    }
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        out["events"] = sse_events(response.text)
    elif ctype.startswith("application/json"):
        out["json"] = response.json()
    elif case.path != "/metrics":
        out["text"] = response.text
    return out


def sse_events(text: str) -> list[Any]:
    """Each event's data (JSON-decoded, or "[DONE]"); an event that is not one ``data:`` line stays a string."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith("data: ") and "\n" not in block:
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            events.append({"<malformed event>": block})
    return events


def _mask_id(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    match = _ID_RE.match(value)
    return (
        f"{match.group(1)}<{len(match.group(2)) if match.group(1) == 'chatcmpl-tool-' else 'id'}>"
        if match
        else f"<id {value[:12]}?>"
    )


def _arguments_kind(value: str) -> str:
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return "<arguments: not JSON>"
    return "<arguments: JSON object>" if isinstance(decoded, dict) else "<arguments: not an object>"


def _mask_arguments(value: Any, *, whole: bool) -> Any:
    if not isinstance(value, str) or value == "":
        return value
    return _arguments_kind(value) if whole else "<arguments piece>"


def _mask_count(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _mask_count(value) for key, value in node.items()}
    if isinstance(node, int) and not isinstance(node, bool) and node > 0:
        return "<int > 0>"
    return node


def _mask_usage(usage: Any) -> Any:
    """Counts become 0 or "<int > 0>"; ``total_tokens`` says whether it is the sum of the two others."""
    if not isinstance(usage, dict):
        return usage
    out = _mask_count(usage)
    counts: list[Any] = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    if all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        prompt, completion, total = counts
        out["total_tokens"] = (
            "<prompt + completion>"
            if total == prompt + completion
            else f"<{total}: not prompt + completion ({prompt} + {completion})>"
        )
    return out


def _walk(node: Any, *, streamed: bool) -> Any:
    if isinstance(node, list):
        return [_walk(item, streamed=streamed) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "id":
            out[key] = _mask_id(value)
        elif key == "system_fingerprint" and isinstance(value, str):
            out[key] = re.sub(r"-[0-9a-z]{8}$", "-<hash8>", value)
        elif key == "created":
            out[key] = "<int>" if isinstance(value, int) else value
        elif key in _TEXT_KEYS:
            out[key] = "<text>" if isinstance(value, str) and value else value
        elif key == "arguments":
            out[key] = _mask_arguments(value, whole=not streamed)
        elif key == "usage":
            out[key] = _mask_usage(value)
        else:
            out[key] = _walk(value, streamed=streamed)
    return out


def _is_piece(event: Any) -> bool:
    """A chunk of generated text or arguments only, which a different tokenizer would cut differently."""
    if not isinstance(event, dict) or event.get("usage") is not None:
        return False
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        delta = choice.get("delta", {})
        if not isinstance(delta, dict) or "role" in delta:
            return False
        for call in delta.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or set(call) - {"index", "function"} or set(function) - {"arguments"}:
                return False
    return True


def _streamed_arguments(events: list[Any]) -> dict[str, str]:
    """Each streamed tool call's argument pieces joined (per choice and call index) and checked as a whole."""
    joined: dict[str, str] = {}
    for event in events:
        for choice in event.get("choices") or [] if isinstance(event, dict) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            for call in delta.get("tool_calls") or [] if isinstance(delta, dict) else []:
                if not isinstance(call, dict):
                    continue
                function = call.get("function")
                piece = function.get("arguments") if isinstance(function, dict) else None
                key = f"choice {choice.get('index')} call {call.get('index')}"
                joined[key] = joined.get(key, "") + (piece if isinstance(piece, str) else "")
    return {key: _arguments_kind(text) for key, text in joined.items()}


def normalize(recording: dict[str, Any], case: Case) -> dict[str, Any]:
    """``recording`` with the ignored values masked (see the module docstring)."""
    out = {"status": recording["status"], "headers": recording["headers"]}
    if "json" in recording:
        body = _walk(recording["json"], streamed=False)
        if case.path == "/tokenize" and isinstance(body, dict):
            body = {**body, **{k: f"<{type(body[k]).__name__}>" for k in ("count", "tokens") if k in body}}
        if case.path == "/v1/models" and isinstance(body, dict):
            for card in body.get("data") or []:
                card["root"] = "<model path>"
        out["json"] = body
    if "events" in recording:
        events: list[Any] = []
        for event in _walk(recording["events"], streamed=True):
            if not (events and events[-1] == event and _is_piece(event)):
                events.append(event)
        out["events"] = events
        arguments = _streamed_arguments(recording["events"])
        if arguments:
            out["streamed arguments"] = arguments
    if "text" in recording:
        out["text"] = recording["text"]
    return out


def differences(expected: Any, actual: Any, where: str = "$") -> list[str]:
    """Human-readable differences between two normalized answers (empty when they match)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in expected.keys() | actual.keys():
            if key not in actual:
                found.append(f"{where}.{key}: missing (vLLM has {expected[key]!r})")
            elif key not in expected:
                found.append(f"{where}.{key}: extra (mock has {actual[key]!r})")
            else:
                found += differences(expected[key], actual[key], f"{where}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [
                f"{where}: {len(expected)} items in vLLM's, {len(actual)} in the mock's:\n  vLLM: "
                f"{json.dumps(expected)}\n  mock: {json.dumps(actual)}"
            ]
        found = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            found += differences(e, a, f"{where}[{i}]")
        return found
    if expected != actual or type(expected) is not type(actual):
        return [f"{where}: vLLM {expected!r}, mock {actual!r}"]
    return []
