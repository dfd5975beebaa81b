"""The mock vLLM server's deterministic answers: what each choice of a parsed request generates (reasoning,
content or one tool call, and the finish reason), in vLLM 0.33.0's manner.

Everything here is pure and synchronous; ``llmpod.mock.requests`` validates and parses the request,
``llmpod.mock.tokens`` counts, ``llmpod.mock.shapes`` turns answers into vLLM's JSON and ``llmpod.mock.server``
adds HTTP, timing and fault injection.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from llmpod.mock import tool_arguments
from llmpod.mock import tools as mock_tools
from llmpod.mock.requests import ParsedRequest
from llmpod.mock.tokens import TOKEN_RE, tokenize

_ECHO_TOKENS = 4
_ARGUMENT_PIECE_CHARS = 8
_VOCAB = (
    "amber",
    "basalt",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lagoon",
    "meadow",
    "nectar",
    "obsidian",
    "prairie",
    "quartz",
    "river",
    "saffron",
    "tundra",
    "umber",
    "valley",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
    "anchor",
    "beacon",
    "canyon",
    "dune",
    "estuary",
    "falcon",
    "glacier",
    "heron",
    "island",
    "jasper",
    "kelp",
    "lantern",
    "marble",
    "nimbus",
    "orchid",
    "pebble",
    "quill",
    "reef",
    "summit",
)
_CHAT_PREFIX = ("Mock", " answer", " to", ":")
_REASONING_PREFIX = ("Thinking", " about", ":")
_COMPLETION_PREFIX = (" Mock", " completion", " of", ":")


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
        return [args[i : i + _ARGUMENT_PIECE_CHARS] for i in range(0, len(args), _ARGUMENT_PIECE_CHARS)]


@dataclass
class Output:
    """What one choice generated; every piece of ``reasoning`` and ``content`` is one token."""

    index: int
    reasoning: list[str]
    content: list[str]
    tool_call: ToolCall | None
    finish_reason: str
    forced_tool: bool = False  # tool_choice "required" or named: vLLM answers content "" rather than null

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


def generate(
    req: ParsedRequest, *, chunk_count: int, reasoning: bool, max_model_len: int, tool_parser: str | None = None
) -> list[Output]:
    """The deterministic answer to a request: one Output per choice (prompt-major, then ``n``).

    Like vLLM 0.33, a ``max_tokens`` that does not fit beside the prompt is lowered to what is left of the
    context (vllm/entrypoints/serve/utils/api_utils.py:get_max_tokens), not refused."""
    outputs = []
    forced = req.tool_choice == "required" or isinstance(req.tool_choice, dict)
    for p, prompt in enumerate(req.prompts):
        room = max_model_len - len(prompt.ids)
        budget = min(req.max_tokens, room) if req.max_tokens is not None else room
        for i in range(req.n):
            index = p * req.n + i
            rng = random.Random(hashlib.sha256(req.digest + str(index).encode()).digest())
            wanted_reasoning = max(1, chunk_count // 2) if reasoning and req.kind == "chat" else 0
            thoughts = _pieces(_REASONING_PREFIX, prompt.quote, rng, min(wanted_reasoning, budget))
            left = budget - len(thoughts)
            call = None
            if req.tool is not None:
                name = req.tool["function"]["name"]
                args = json.dumps(tool_arguments.arguments(req.tool), ensure_ascii=False)
                call = ToolCall(mock_tools.call_id(tool_parser, name), name, args)
                if call.tokens > left:
                    call = None  # cut off mid-call: vLLM's parser gives up and returns the raw text
            if call is not None:
                # vllm/entrypoints/serve/utils/tool_calls_utils.py:resolve_finish_reason: a named tool is "stop"
                finish = "stop" if isinstance(req.tool_choice, dict) else "tool_calls"
                outputs.append(Output(index, thoughts, [], call, finish, forced))
                continue
            prefix = _CHAT_PREFIX if req.kind == "chat" else _COMPLETION_PREFIX
            content = _pieces(prefix, prompt.quote, rng, max(0, min(chunk_count, left)))
            # A tool call that did not fit means the model was cut off mid-call.
            truncated = len(thoughts) < wanted_reasoning or len(content) < chunk_count or req.tool is not None
            outputs.append(Output(index, thoughts, content, None, "length" if truncated else "stop", forced))
    return outputs
