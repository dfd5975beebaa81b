"""Server-sent events in, assembled answers out.

The proxy always asks vLLM for a stream (so streamed and plain requests share one cache entry, and long
generations survive RunPod's 100 s proxy timeout) and assembles the plain answer from the chunks itself.
"""

from __future__ import annotations

from typing import Any

DONE = b"[DONE]"


class SSEParser:
    """Incremental parser: feed it bytes as they arrive, get back the ``data`` payload of each event.

    Follows the WHATWG rules the openai SDKs use: CR, LF or CRLF line ends, ``:`` comments ignored,
    several ``data:`` lines joined with a newline, an event dispatched at a blank line.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._after_cr = False  # the last byte fed was a CR: an LF that comes next belongs to it

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across reads
            self._after_cr = False
        if chunk:
            self._after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._buffer += chunk
        events: list[bytes] = []
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # event:, id:, retry: and comments carry nothing vLLM uses
        return events

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are still buffered (a stream cut mid-event)."""
        return bool(self._data or self._buffer.strip())


def is_usage_only(chunk: dict[str, Any]) -> bool:
    """The ``stream_options.include_usage`` chunk: ``"choices": []`` and a usage object."""
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


class _Choice:
    __slots__ = ("content", "finish_reason", "logprobs", "reasoning", "role", "stop_reason", "tool_calls")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.reasoning: dict[str, list[str]] = {}
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: Any = None
        self.finish_reason: str | None = None
        self.stop_reason: Any = None


class Assembler:
    """Folds chat or text-completion chunks into the answer vLLM would have sent without streaming."""

    def __init__(self, endpoint: str) -> None:
        self.chat = endpoint == "chat.completions"
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.choices: dict[int, _Choice] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for raw in chunk.get("choices") or ():
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            choice = self.choices.get(index)
            if choice is None:
                choice = self.choices[index] = _Choice()
            if self.chat:
                self._add_delta(choice, raw.get("delta") or {})
            elif isinstance(raw.get("text"), str):
                choice.content.append(raw["text"])
            if raw.get("logprobs") is not None:
                choice.logprobs = _merge_logprobs(choice.logprobs, raw["logprobs"])
            if raw.get("finish_reason") is not None:
                choice.finish_reason = raw["finish_reason"]
                choice.stop_reason = raw.get("stop_reason")

    @staticmethod
    def _add_delta(choice: _Choice, delta: dict[str, Any]) -> None:
        if delta.get("role"):
            choice.role = delta["role"]
        if isinstance(delta.get("content"), str):
            choice.content.append(delta["content"])
        for field in ("reasoning", "reasoning_content"):
            if isinstance(delta.get(field), str):
                choice.reasoning.setdefault(field, []).append(delta[field])
        for call in delta.get("tool_calls") or ():
            slot = choice.tool_calls.setdefault(
                call.get("index", 0), {"id": None, "type": "function", "name": "", "arguments": []}
            )
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            function = call.get("function") or {}
            if function.get("name"):
                slot["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                slot["arguments"].append(function["arguments"])

    @property
    def complete(self) -> bool:
        """Every choice finished normally (not aborted or errored) and produced something."""
        if not self.choices:
            return False
        for choice in self.choices.values():
            if choice.finish_reason in (None, "abort", "error"):
                return False
            reasoned = any("".join(parts) for parts in choice.reasoning.values())
            if not ("".join(choice.content) or choice.tool_calls or reasoned):
                return False
        return True

    @property
    def completion_tokens(self) -> int:
        return int((self.usage or {}).get("completion_tokens") or 0)

    def result(self) -> dict[str, Any]:
        choices = [self._choice(index, self.choices[index]) for index in sorted(self.choices)]
        body: dict[str, Any] = {
            "id": self.head.get("id"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.head.get("created"),
            "model": self.head.get("model"),
            "choices": choices,
            "usage": self.usage,
        }
        if "system_fingerprint" in self.head:
            body["system_fingerprint"] = self.head["system_fingerprint"]
        return body

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.content)
        common = {"logprobs": choice.logprobs, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
        if not self.chat:
            return {"index": index, "text": text, **common}
        message: dict[str, Any] = {
            "role": choice.role,
            "content": text if (text or not choice.tool_calls) else None,
        }
        if choice.tool_calls:  # vLLM 0.33 leaves an empty list out of its answers (ChatMessage), so do we
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": call["type"],
                    "function": {"name": call["name"], "arguments": "".join(call["arguments"])},
                }
                for _, call in sorted(choice.tool_calls.items())
            ]
        for field, parts in choice.reasoning.items():
            message[field] = "".join(parts)
        return {"index": index, "message": message, **common}


def _merge_logprobs(current: Any, new: Any) -> Any:
    """Concatenate per-token logprob lists (chat: ``content``; completions: ``tokens``, ``text_offset``…)."""
    if current is None or not isinstance(new, dict) or not isinstance(current, dict):
        return new if current is None else current
    merged = dict(current)
    for key, value in new.items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        elif key not in merged or merged[key] is None:
            merged[key] = value
    return merged
