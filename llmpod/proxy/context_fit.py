"""Fitting ``max_tokens`` to the model's context, doing no more than the upstream's vLLM release needs.

What vLLM does (its wheels' ``vllm/renderers/params.py`` ``TokenizeParams``, and vLLM 0.33.0's own server):

- Every release from 0.27.1 to 0.34.0 refuses ``max_tokens`` (or ``max_completion_tokens``) above
  ``max_model_len`` with a 400. 0.33.0 says "max_tokens=32000 cannot be greater than max_model_len=16384. Please
  request fewer output tokens."; 0.27.1 to 0.30.0 print "max_model_len=max_total_tokens=16384" there.
- Up to 0.31.0, prompt plus ``max_tokens`` over ``max_model_len`` is a 400 too (``max_input_tokens`` is
  ``max_total_tokens - max_output_tokens``): "This model's maximum context length is 16384 tokens. However, you
  requested 32000 output tokens and your prompt contains [at least ]N input tokens, for a total of ...".
- From 0.32.0, ``max_input_tokens`` is the whole context and ``get_max_tokens()``
  (``vllm/entrypoints/serve/utils/api_utils.py``) lowers ``max_tokens`` to what the prompt leaves: a request
  only has to keep ``max_tokens`` at most ``max_model_len``, which needs no call at all.

For older (or unknown) servers the proxy must know the prompt's size, without a round trip per turn: an agent's
turns repeat the whole conversation so far, so the token count vLLM reported for one turn (``usage.prompt_tokens``,
or a ``/tokenize`` answer) bounds the next turn's prompt: those tokens, plus at most one token per byte of the
messages added since (byte-level BPE and byte-fallback tokenizers never make more tokens than bytes).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

SELF_LOWERING = (0, 32)  # first vLLM release that lowers max_tokens itself (0.31.0 still refuses, 0.32.0 lowers)
TOKEN_MARGIN = 256  # chat templates add tokens (default system prompts, role headers) that the JSON does not show
BOUND_SHARE = 0.5  # the bound may cost the answer at most half its room before the proxy asks vLLM to count
MEMORY_SIZE = 4096  # prompt prefixes remembered

# 0.27.1-0.34.0: "max_tokens=32000 cannot be greater than max_model_len=16384." (0.27.1-0.30.0 print
# "max_model_len=max_total_tokens=16384")
_OVER_LIMIT = re.compile(
    r"max_(?:completion_)?tokens=\d+ cannot be greater than max_model_len=(?:max_total_tokens=)?"
    r"(\d+)"
)
_MAX_LEN = re.compile(r"maximum context length is (\d+) tokens")
# 0.27.1-0.31.0 "...your prompt contains 1200 input tokens, for a total of..." (0.32.0+: "...which exceeds this limit
# even without any output tokens"); "contains at least N" (the prompt was cut at the limit) and "contains N
# characters" give no count. Releases before the renderers (vLLM issue reports; not checked against a wheel here):
# "...and your request has 120 input tokens (32000 > 16384 - 120)".
_INPUT_TOKENS = (
    re.compile(r"your prompt contains (\d+) input tokens"),
    re.compile(r"your request has (\d+) input tokens"),
)


def parse_version(text: Any) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of a vLLM version string such as ``0.33.0``, ``0.34.0+cu128``, ``0.32.1rc2``."""
    found = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip()) if isinstance(text, str) else None
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2)), int(found.group(3) or 0)


def lowers_max_tokens_itself(version: tuple[int, int, int] | None) -> bool:
    """Whether that release fits prompt + max_tokens itself (an unknown version is assumed not to)."""
    return version is not None and version[:2] >= SELF_LOWERING


def refusal_from_error(message: str) -> tuple[int, int | None] | None:
    """``(max_model_len, prompt tokens or None)`` from a vLLM 400 about the context, if the message is one."""
    limit = _OVER_LIMIT.search(message) or _MAX_LEN.search(message)
    if limit is None:
        return None
    for pattern in _INPUT_TOKENS:
        found = pattern.search(message)
        if found:
            return int(limit.group(1)), int(found.group(1))
    return int(limit.group(1)), None


def requested_tokens(body: dict[str, Any]) -> int | None:
    return max((body[f] for f in ("max_tokens", "max_completion_tokens") if is_int(body.get(f))), default=None)


def cap_max_tokens(body: dict[str, Any], allowed: int) -> dict[str, Any] | None:
    """A copy of ``body`` whose max token fields are at most ``allowed``, or None if nothing changes."""
    if allowed < 1:
        return None  # the prompt alone is too long: let vLLM say so
    fields = [f for f in ("max_tokens", "max_completion_tokens") if is_int(body.get(f)) and body[f] > allowed]
    if not fields:
        return None
    return {**body, **dict.fromkeys(fields, allowed)}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PromptMemory:
    """Prompt token counts vLLM reported, by prompt prefix: a chat's leading messages (with the model and tools,
    which the template renders too), or a completion's whole prompt."""

    def __init__(self, size: int = MEMORY_SIZE) -> None:
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._size = size

    @staticmethod
    def _prefixes(body: dict[str, Any]) -> list[tuple[bytes, int]]:
        """For each prefix of the prompt, shortest first: its hash and its size in JSON bytes."""
        messages = body.get("messages")
        parts = messages if isinstance(messages, list) else [body.get("prompt")]
        seed = orjson.dumps(
            [body.get("model"), body.get("tools"), body.get("chat_template_kwargs"), isinstance(messages, list)]
        )
        digest, size, prefixes = hashlib.blake2b(seed, digest_size=16).digest(), 0, []
        for part in parts:
            encoded = orjson.dumps(part)
            digest = hashlib.blake2b(digest + encoded, digest_size=16).digest()
            size += len(encoded)
            prefixes.append((digest, size))
        return prefixes

    def bound(self, body: dict[str, Any], body_bytes: int) -> tuple[int, int]:
        """``(upper, lower)`` bounds of the prompt's tokens: the longest remembered prefix's count plus a token
        per byte added since; with nothing remembered, a token per byte of the whole body."""
        prefixes = self._prefixes(body)
        for digest, size in reversed(prefixes):
            known = self._counts.get(digest)
            if known is not None:
                self._counts.move_to_end(digest)
                added = prefixes[-1][1] - size
                return known + added + (TOKEN_MARGIN if added else 0), known
        return body_bytes + TOKEN_MARGIN, 0

    def learn(self, body: dict[str, Any], prompt_tokens: Any) -> None:
        if not is_int(prompt_tokens):
            return
        digest = self._prefixes(body)[-1][0]
        self._counts[digest] = prompt_tokens
        self._counts.move_to_end(digest)
        if len(self._counts) > self._size:
            self._counts.popitem(last=False)


async def fit(
    body: dict[str, Any],
    body_bytes: int,
    limit: int | None,
    lowers_itself: bool,
    memory: PromptMemory,
    count: Callable[[dict[str, Any]], Awaitable[int | None]],
) -> dict[str, Any]:
    """``body``, or a copy with ``max_tokens`` lowered so vLLM accepts it (see the module's doc)."""
    requested = requested_tokens(body)
    if limit is None or requested is None:
        return body
    if lowers_itself:
        return cap_max_tokens(body, limit) or body
    upper, known = memory.bound(body, body_bytes)
    if requested + upper <= limit:
        return body
    room = limit - upper
    if room < (limit - known) * BOUND_SHARE:  # only vLLM's own count leaves the answer its room
        tokens = await count(body)
        if tokens is None:
            return body  # vLLM's 400, if any, is the fallback (Upstream.open_stream)
        memory.learn(body, tokens)
        room = limit - tokens
    return cap_max_tokens(body, room) or body
