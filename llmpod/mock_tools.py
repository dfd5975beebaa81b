"""Tool calling in the mock vLLM server: which tool the mock model calls, and with which arguments.

vLLM 0.33 only parses tool calls when started with ``--enable-auto-tool-choice --tool-call-parser NAME``; the
refusals without them live in ``mock_generation``. With them, the mock calls at most one tool per answer:

- ``tool_choice`` naming a function: that one. ``"required"``: a read-only tool (one the user's last message names
  first), else a tool it names, else the first. ``"auto"`` (or absent): only a READ-ONLY tool, and only when the
  conversation ends with a user message that names one or says "call" or "use" (then the safest read-only tool);
  otherwise (a message asking for a change, such as Kilo's "write hello.py", included), and after a tool result,
  the model answers in words.

The arguments are VALID against the tool's JSON schema (types, ``enum``/``const``, ``required``, ``default``,
nested objects and arrays, string and number bounds) and HARMLESS, because an agent in ``manage_pod.py --local``
mode executes them in the user's repository: paths are ``.``, or ``README.md`` for a read-only tool (never a new
file with a made-up name), commands are ``echo``, booleans are false (no ``recursive``, ``force``), and optional
fields are left out unless they have a default. A tool that changes things, called only when forced, gets
arguments that fail or do nothing: path ``.`` (a directory, which no write or edit tool can overwrite as a file),
empty text, as few array items as the schema allows.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

# `ToolParserManager.list_registered()` of vLLM 0.33.0: what --tool-call-parser accepts
VLLM_TOOL_PARSERS = (
    "apertus",
    "beam",
    "cohere_command3",
    "cohere_command4",
    "deepseek_v3",
    "deepseek_v31",
    "deepseek_v32",
    "deepseek_v4",
    "deepseek_v41",
    "dots",
    "ernie45",
    "functiongemma",
    "gemma4",
    "gigachat3",
    "glm45",
    "glm47",
    "granite",
    "granite-20b-fc",
    "granite4",
    "hermes",
    "hf",
    "hunyuan_a13b",
    "hy_v3",
    "hy_v4",
    "inkling",
    "internlm",
    "jamba",
    "k2_horizon",
    "kimi_k2",
    "kimi_k3",
    "lfm2",
    "ling3",
    "llama3_json",
    "llama4_json",
    "llama4_pythonic",
    "longcat",
    "mimo",
    "minicpm5",
    "minimax_m2",
    "minimax_m3",
    "mistral",
    "muse",
    "muse_glimmer",
    "musespark1x",
    "olmo3",
    "openai",
    "phi4_mini_json",
    "plamo3",
    "poolside_v1",
    "pythonic",
    "qwen3_coder",
    "qwen3_json",
    "qwen3_xml",
    "seed_oss",
    "step3",
    "step3p5",
    "step5",
    "xlam",
)

# Name fragments of tools that only look (safe to call) and of tools that change things (called only when named).
_READ_ONLY = (
    "read",
    "list",
    "search",
    "find",
    "grep",
    "glob",
    "get",
    "view",
    "show",
    "fetch",
    "query",
    "lookup",
    "ask",
    "question",
    "attempt_completion",
    "complete",
    "status",
    "describe",
    "inspect",
)
_MUTATING = (
    "write",
    "edit",
    "create",
    "delete",
    "remove",
    "apply",
    "replace",
    "insert",
    "execute",
    "exec",
    "run",
    "command",
    "move",
    "rename",
    "patch",
    "update",
    "save",
    "commit",
    "push",
    "install",
    "terminal",
    "shell",
    "bash",
    "new_task",
    "switch",
    "browser",
    "kill",
)
_ASK_TO_CALL = re.compile(r"\b(call|use)\b")
_MAX_DEPTH = 6


def _safety(tool: dict[str, Any]) -> int:
    """0 for a read-only tool, 1 for one we cannot tell, 2 for one that changes things."""
    name = str(tool["function"]["name"]).lower()
    if any(word in name for word in _MUTATING) and not any(word in name for word in ("read", "list", "search")):
        return 2
    return 0 if any(word in name for word in _READ_ONLY) else 1


def _named_in(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in tools if re.search(rf"(?<!\w){re.escape(str(t['function']['name']).lower())}(?!\w)", text)]


def pick_tool(
    tools: list[dict[str, Any]],
    choice: Any,
    messages: list[dict[str, Any]],
    user_text: str,
) -> dict[str, Any] | None:
    """The tool the mock model calls (``tools`` and ``choice`` already validated), or None to answer in words.

    On its own (``"auto"``) the mock calls only read-only tools: an agent in ``manage_pod.py --local`` runs the
    call in the user's repository, so "write hello.py" must not get back a write (or edit, or bash)."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return next(dict(t) for t in tools if t["function"]["name"] == name)
    text = user_text.lower()
    named = sorted(_named_in(text, tools), key=_safety)
    safest = sorted(tools, key=_safety)
    looking = [t for t in named + safest if _safety(t) == 0]
    if choice == "required":  # a read-only tool if there is one, named ones first; else what the user named
        return dict((looking or named or safest)[0])
    if choice != "auto" or not messages or messages[-1].get("role") != "user":
        return None  # "none", or after a tool result: the model answers in words
    if named and _safety(named[0]) == 0:
        return dict(named[0])
    if _ASK_TO_CALL.search(text) and looking:
        return dict(looking[0])
    return None  # asked for a change ("write hello.py"): words, never a tool that changes things


def call_id(parser: str | None, name: str, index: int = 0) -> str:
    """A tool call id as vLLM 0.33's parser makes it (vllm/renderers/chat_utils/tool_call.py:make_tool_call_id,
    vllm/tool_parsers/*): kimi_k2 numbers calls per function, mistral uses 9 letters and digits, most parsers
    ``chatcmpl-tool-`` and 16 hex digits."""
    if parser in ("kimi_k2", "kimi_k3"):
        return f"functions.{name}:{index}"
    if parser == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    if parser in ("hunyuan_a13b", "minicpm5"):
        return f"call_{secrets.token_hex(8)}"
    if parser == "xlam":
        return f"call_{index}_{secrets.token_hex(8)}"
    return f"chatcmpl-tool-{secrets.token_hex(8)}"


# ------------------------------------------------------------------------------------------- arguments


def arguments(tool: dict[str, Any]) -> dict[str, Any]:
    """Harmless arguments for ``tool`` that its parameters' JSON schema accepts.

    A tool that is not read-only (it writes, edits, runs, or we cannot tell) is called only when forced, and then
    with arguments that fail or do nothing: every path is ``.`` (no tool can write or edit a directory as a file),
    free text is empty, arrays have as few items as the schema allows."""
    function = tool["function"]
    params = function.get("parameters") or {}
    value = _value(
        params if params.get("type") or params.get("properties") else {"type": "object"},
        key="",
        tool=_Tool(str(function["name"]).lower(), _safety(tool) == 0),
        depth=0,
    )
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class _Tool:
    name: str
    read_only: bool


def _first_type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        options = [k for k in kind if k != "null"] or kind
        return str(options[0]) if options else None
    if kind is None and "properties" in schema:
        return "object"
    return str(kind) if kind is not None else None


def _value(schema: Any, *, key: str, tool: _Tool, depth: int) -> Any:
    if not isinstance(schema, dict):
        return "mock"
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            real = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")] or options
            return _value(
                {**{k: v for k, v in schema.items() if k != combinator}, **real[0]},
                key=key,
                tool=tool,
                depth=depth,
            )
    kind = _first_type(schema)
    if kind == "object":
        return _object(schema, tool=tool, depth=depth)
    if kind == "array":
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        count = min(max(low, 1), int(high)) if high is not None else max(low, 1)
        if depth >= _MAX_DEPTH or "items" not in schema or not tool.read_only:
            count = low
        return [_value(schema.get("items", {}), key=key, tool=tool, depth=depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _string(schema, key=key, tool=tool)


def _object(schema: dict[str, Any], *, tool: _Tool, depth: int) -> dict[str, Any]:
    props = schema.get("properties") or {}
    out: dict[str, Any] = {}
    if depth >= _MAX_DEPTH:
        return out
    for name in schema.get("required") or []:
        out[name] = _value(props.get(name, {"type": "string"}), key=name, tool=tool, depth=depth + 1)
    for name, prop in props.items():  # optional fields only when the schema says what they default to
        if name not in out and isinstance(prop, dict) and "default" in prop:
            out[name] = prop["default"]
    return out


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    value: float = 1
    if "minimum" in schema:
        value = max(value, float(schema["minimum"]))
    if "exclusiveMinimum" in schema and isinstance(schema["exclusiveMinimum"], (int, float)):
        value = max(value, float(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        value = min(value, float(schema["maximum"]))
    if "exclusiveMaximum" in schema and isinstance(schema["exclusiveMaximum"], (int, float)):
        value = min(value, float(schema["exclusiveMaximum"]) - (1 if integer else 0.5))
    return int(value) if integer else value


def _string(schema: dict[str, Any], *, key: str, tool: _Tool) -> str:
    name = key.lower()
    fmt = schema.get("format")
    if fmt in ("uri", "url") or name in ("url", "uri"):
        text = "https://example.com"
    elif fmt == "date-time":
        text = "2024-01-01T00:00:00Z"
    elif fmt == "date":
        text = "2024-01-01"
    elif any(w in name for w in ("dir", "folder", "cwd")) or (
        any(w in name for w in ("path", "file"))
        and (not tool.read_only or any(w in tool.name for w in ("list", "search", "glob", "find", "grep", "dir")))
    ):
        text = "."  # a directory: what a listing wants, and what no write or edit can overwrite
    elif any(w in name for w in ("path", "file")):
        text = "README.md"  # a read-only tool reads the file every repository has
    elif any(w in name for w in ("command", "cmd", "shell", "script")):
        text = "echo llmpod mock"
    elif any(w in name for w in ("regex", "pattern", "query", "search", "keyword", "term")):
        text = "TODO"
    elif "question" in name:
        text = "What should I do next?"
    elif any(w in name for w in ("result", "summary", "answer", "message", "reason")):
        text = "Done (an answer from the mock vLLM server)."
    else:
        text = "mock" if tool.read_only else ""  # nothing to write, post or launch
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    if len(text) < low:
        text = ((text or "mock") * (low // max(len(text or "mock"), 1) + 1))[:low]
    if high is not None:
        text = text[: int(high)]
    return text
