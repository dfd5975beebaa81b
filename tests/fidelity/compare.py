"""Send a corpus case to a server and reduce the answer to what must match between vLLM and the mock.

What is ignored, and why (everything else must be equal: status codes, the recorded headers, every key and its
order-insensitive presence, value types, nulls, error types, messages and params, finish reasons, delta shapes):
- ids and ``created``: random and time; ids keep their prefix (``chatcmpl-``, ``cmpl-``, ``chatcmpl-tool-``,
  ``modelperm-``) and the tool call id's length.
- generated text (``content``, ``text``, ``reasoning`` and tool call ``arguments``, whole or streamed): the stub
  engine answers hash words, the mock echoes the prompt. Empty strings are NOT masked (the final chunk's
  ``{"content": ""}`` is a shape), and non-streamed arguments must still be a JSON object.
- token counts (``usage`` numbers, ``/tokenize`` ids and count, numbers in a message that quotes the prompt's
  length): the stub's tokenizer is not the mock's.
- how many content chunks a stream has: consecutive events that are equal once text is masked count as one,
  since the number of pieces depends on the tokenizer too.
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


def _mask_arguments(value: Any, *, whole: bool) -> Any:
    if not isinstance(value, str) or value == "":
        return value
    if not whole:
        return "<arguments piece>"
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return "<arguments: not JSON>"
    return "<arguments: JSON object>" if isinstance(decoded, dict) else "<arguments: not an object>"


def _walk(node: Any, *, streamed: bool, in_usage: bool = False) -> Any:
    if isinstance(node, list):
        return [_walk(item, streamed=streamed, in_usage=in_usage) for item in node]
    if not isinstance(node, dict):
        if in_usage and isinstance(node, int) and not isinstance(node, bool):
            return "<int>"
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
            out[key] = _walk(value, streamed=streamed, in_usage=True)
        else:
            out[key] = _walk(value, streamed=streamed, in_usage=in_usage)
    return out


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
        error = body.get("error") if isinstance(body, dict) else None
        if case.counts_in_message and isinstance(error, dict) and isinstance(error.get("message"), str):
            error["message"] = re.sub(r"\d+", "<n>", error["message"])
        out["json"] = body
    if "events" in recording:
        events: list[Any] = []
        for event in _walk(recording["events"], streamed=True):
            if not events or events[-1] != event:
                events.append(event)
        out["events"] = events
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
