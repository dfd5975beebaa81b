"""A Kilo Code agent turn of the recorded size and shape, and the turns of a session that follows it.

The recorded body (``tests/fixtures/clients/kilo_turn.json``) is used when it exists. Until then: a synthetic one
of the same size and shape, a system prompt of about 35 KB, 16 tools of about 15 KB in all, and a user turn with
``<environment_details>``; streamed, with usage, ``max_tokens`` 32000 and ``tool_choice`` "auto", as Kilo sends
(about 55 KB in all). Deterministic: the same text on every run.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import orjson

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "clients" / "kilo_turn.json"
TOOL_NAMES = (
    "read_file",
    "write_to_file",
    "apply_diff",
    "insert_content",
    "search_and_replace",
    "search_files",
    "list_files",
    "list_code_definition_names",
    "execute_command",
    "browser_action",
    "use_mcp_tool",
    "access_mcp_resource",
    "ask_followup_question",
    "attempt_completion",
    "switch_mode",
    "new_task",
)
WORDS = (
    "the",
    "file",
    "tool",
    "use",
    "must",
    "user",
    "task",
    "when",
    "each",
    "path",
    "content",
    "before",
    "after",
    "result",
    "project",
    "directory",
    "command",
    "always",
    "never",
    "step",
    "change",
    "code",
    "line",
    "error",
    "output",
    "workspace",
    "relative",
    "current",
    "approval",
    "response",
    "parameter",
    "required",
    "example",
)


def _prose(rng: random.Random, size: int) -> str:
    """English-like instructions with markdown and code, about ``size`` bytes."""
    parts: list[str] = []
    length = 0
    while length < size:
        kind = rng.random()
        if kind < 0.08:
            piece = f"\n\n## {' '.join(rng.choice(WORDS).upper() for _ in range(3))}\n\n"
        elif kind < 0.14:
            piece = (
                f"\n```\n<{rng.choice(TOOL_NAMES)}>\n<path>src/{rng.choice(WORDS)}.ts</path>\n"
                f"<line_range>{rng.randint(1, 90)}-{rng.randint(100, 400)}</line_range>\n"
                f"</{rng.choice(TOOL_NAMES)}>\n```\n"
            )
        else:
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
            piece = "- " + " ".join(words).capitalize() + ".\n"
        parts.append(piece)
        length += len(piece)
    return "".join(parts)


def _tool(rng: random.Random, name: str) -> dict[str, Any]:
    properties = {word: {"type": "string", "description": _prose(rng, 60).strip()} for word in rng.sample(WORDS, 4)}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": _prose(rng, 200).strip(),
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(properties)[:2],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }


def synthetic_turn() -> dict[str, Any]:
    rng = random.Random(13)
    environment = (
        "<environment_details>\n# VSCode Visible Files\nsrc/app.ts\n\n# Current Time\n"
        "2026-12-03T12:00:00Z\n\n# Current Mode\n<slug>code</slug>\n\n# Current Workspace Directory "
        "(/home/user/project) Files\n"
        + "\n".join(f"src/{w}_{i}.ts" for i, w in enumerate(WORDS))
        + "\n</environment_details>"
    )
    return {
        "model": "kilo-model",
        "messages": [
            {"role": "system", "content": _prose(rng, 35_000)},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<task>\nAdd a --verbose flag to the CLI and document it.\n</task>"},
                    {"type": "text", "text": environment},
                ],
            },
        ],
        "tools": [_tool(rng, name) for name in TOOL_NAMES],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 32000,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def first_turn() -> dict[str, Any]:
    """The recorded turn when there is one, else the synthetic one."""
    if FIXTURE.exists():
        body = orjson.loads(FIXTURE.read_bytes())
        return body.get("body", body) if isinstance(body, dict) else body
    return synthetic_turn()


def session(turns: int, model: str, nonce: str) -> list[dict[str, Any]]:
    """``turns`` bodies of one session: each repeats the one before, plus an assistant tool call and its result
    (a file of 1-4 KB, as Kilo's read_file returns) with fresh environment details. ``nonce`` makes a run's
    session its own (no cache hit from an earlier run)."""
    rng = random.Random(nonce)
    body = first_turn()
    body["model"] = model
    first, tag = body["messages"][0], f"[{nonce}]\n"
    content = first.get("content")  # a string, or content parts (a recording may have either)
    body["messages"][0] = {
        **first,
        "content": tag + content if isinstance(content, str) else [{"type": "text", "text": tag}, *(content or [])],
    }
    bodies = [body]
    for turn in range(1, turns):
        body = copy.deepcopy(body)
        call_id = f"call_{turn}"
        body["messages"] += [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": "read_file",
                            "arguments": orjson.dumps({"path": f"src/part_{turn}.ts"}).decode(),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": _prose(rng, rng.randint(1000, 4000))},
            {
                "role": "user",
                "content": f"<environment_details>\n# Current Time\n2026-12-03T12:{turn:02d}:00Z\n"
                "</environment_details>",
            },
        ]
        bodies.append(body)
    return bodies
