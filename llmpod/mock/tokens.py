"""The mock's toy tokenizer, so ``usage``, ``/tokenize`` and the context check all count alike.

A token is a run of word characters or one other non-space character (``\\w+|[^\\w\\s]``). A completion prompt
costs its tokens; a chat prompt costs, per message, the tokens of its text plus 4 (the template's start, role,
separator and end), plus 2 for the assistant generation prompt. Every generated piece (``llmpod.mock.generation``)
is exactly one token.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_IM_START, _NEWLINE, _IM_END = 1, 2, 3


def tokenize(text: str) -> list[str]:
    """Split text into the mock's tokens."""
    return TOKEN_RE.findall(text)


def token_id(token: str) -> int:
    """A stable id for a token string (ids below 100 are reserved for template tokens)."""
    return 100 + zlib.crc32(token.encode()) % 50_000


def message_text(message: dict[str, Any]) -> str:
    """The text a chat message contributes to the prompt: its text parts and any tool calls it made."""
    content = message.get("content")
    texts = (
        [content]
        if isinstance(content, str)
        else [part["text"] for part in content or [] if isinstance(part.get("text"), str)]
    )
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
