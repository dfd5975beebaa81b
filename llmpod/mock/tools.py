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

import json
import math
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


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Tool names are read by their parts ("search_and_replace", "readFile", "CheckBackgroundJob"), never by substrings
# ("task" is not "ask", "skill" is not "kill"). A part that changes things wins over any part that only looks.
_LOOKING = _words(
    "read list ls search find grep glob get view show fetch query lookup look ask question attempt completion "
    "complete status describe inspect check recall info stat cat explore"
)
_CHANGING = _words(
    "write edit create delete remove rm apply replace insert execute exec run command move mv rename patch update "
    "save commit push install terminal shell bash switch browser kill new task tasks agent subagent spawn launch "
    "start stop restart exit quit process schedule cancel post send set put add append upload deploy todo todos "
    "checklist mark"
)
# changing stems that also count inside a compound part ("todowrite", "multiedit"); looking words of 4+ letters
# count at either end of one ("webfetch", "readfile")
_CHANGING_STEMS = (
    "write",
    "edit",
    "delete",
    "remove",
    "replace",
    "insert",
    "execute",
    "command",
    "rename",
    "patch",
    "update",
    "commit",
    "install",
    "terminal",
    "shell",
    "bash",
    "browser",
    "todo",
    "spawn",
    "launch",
    "schedule",
    "cancel",
    "upload",
    "append",
    "create",
    "apply",
)
_ASK_TO_CALL = re.compile(r"\b(call|use)\b")
_MAX_DEPTH = 6


def _parts(name: str) -> list[str]:
    """The lower-case parts of a tool or field name, split at ``_``, ``-``, ``.`` and camelCase."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return [part for part in re.split(r"[\s_\-.:/]+", spaced.lower()) if part]


def _safety(tool: dict[str, Any]) -> int:
    """0 for a read-only tool, 1 for one we cannot tell, 2 for one that changes things."""
    parts = _parts(str(tool["function"]["name"]))
    if any(part in _CHANGING or any(stem in part for stem in _CHANGING_STEMS) for part in parts):
        return 2
    looking = any(
        part in _LOOKING or any(len(w) >= 4 and (part.startswith(w) or part.endswith(w)) for w in _LOOKING)
        for part in parts
    )
    return 0 if looking else 1


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


def _all_of(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every ``allOf`` branch merged in: properties and required fields of all, the tighter bound."""
    branches = schema.get("allOf")
    if not isinstance(branches, list):
        return schema
    out = {k: v for k, v in schema.items() if k != "allOf"}
    for branch in branches:
        for k, v in _all_of(branch).items() if isinstance(branch, dict) else ():
            if k not in out:
                out[k] = v
            elif k == "properties" and isinstance(v, dict):
                out[k] = {**out[k], **{n: {"allOf": [out[k][n], p]} if n in out[k] else p for n, p in v.items()}}
            elif k == "required" and isinstance(v, list):
                out[k] = list(dict.fromkeys([*out[k], *v]))
            elif k in ("minimum", "minLength", "minItems") or (k == "exclusiveMinimum" and not isinstance(v, bool)):
                out[k] = max(out[k], v)
            elif k in ("maximum", "maxLength", "maxItems") or (k == "exclusiveMaximum" and not isinstance(v, bool)):
                out[k] = min(out[k], v)
    return out


def _value(schema: Any, *, key: str, tool: _Tool, depth: int, variant: int = 0) -> Any:
    """A value for ``schema``; ``variant`` n > 0 asks for one that differs from variants 0..n-1 (``uniqueItems``)."""
    if not isinstance(schema, dict):
        return "mock"
    schema = _all_of(schema)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        enum = schema["enum"]
        if not tool.read_only and not variant:  # a forced changing tool: an action that only looks ("list")
            return next((v for v in enum if isinstance(v, str) and _safety({"function": {"name": v}}) == 0), enum[0])
        return enum[variant % len(enum)]
    if "default" in schema and not variant:
        return schema["default"]
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            real = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")] or options
            branch = real[0] if isinstance(real[0], dict) else {}
            merged = {**{k: v for k, v in schema.items() if k != combinator}, **branch}
            return _value(merged, key=key, tool=tool, depth=depth, variant=variant)
    kind = _first_type(schema)
    if kind == "object":
        return _object(schema, tool=tool, depth=depth, variant=variant)
    if kind == "array":
        return _array(schema, key=key, tool=tool, depth=depth)
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer", variant=variant)
    if kind == "boolean":
        return variant % 2 == 1
    if kind == "null":
        return None
    return _string(schema, key=key, tool=tool, variant=variant)


def _object(schema: dict[str, Any], *, tool: _Tool, depth: int, variant: int) -> dict[str, Any]:
    props = schema.get("properties") or {}
    out: dict[str, Any] = {}
    if depth >= _MAX_DEPTH:
        return out
    for name in schema.get("required") or []:
        prop = props.get(name, {"type": "string"})
        out[name] = _value(prop, key=name, tool=tool, depth=depth + 1, variant=variant)
    for name, prop in props.items():  # optional fields only when the schema says what they default to
        if name not in out and isinstance(prop, dict) and "default" in prop:
            out[name] = prop["default"]
    return out


def _array(schema: dict[str, Any], *, key: str, tool: _Tool, depth: int) -> list[Any]:
    low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
    count = min(max(low, 1), int(high)) if high is not None else max(low, 1)
    if depth >= _MAX_DEPTH or "items" not in schema or not tool.read_only:
        count = low
    unique = bool(schema.get("uniqueItems"))
    items = [
        _value(schema.get("items", {}), key=key, tool=tool, depth=depth + 1, variant=i if unique else 0)
        for i in range(count)
    ]
    if unique:  # a schema that allows fewer distinct values than minItems cannot be met: give what there is
        items = list({json.dumps(item, sort_keys=True): item for item in items}.values())
    return items


def _number(schema: dict[str, Any], *, integer: bool, variant: int) -> int | float:
    """1 (+ variant) moved into the schema's bounds, a whole number for ``integer`` and a multiple of
    ``multipleOf``; draft-4 boolean ``exclusiveMinimum``/``exclusiveMaximum`` are understood too."""

    def bound(name: str) -> tuple[float, bool]:
        value, exclusive = schema.get(name), schema.get(f"exclusive{name.title()}")
        real = [
            float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None for x in (value, exclusive)
        ]
        if real[1] is not None and (
            real[0] is None or (real[1] >= real[0] if name == "minimum" else real[1] <= real[0])
        ):
            return real[1], True
        if real[0] is not None:
            return real[0], exclusive is True
        return (-math.inf if name == "minimum" else math.inf), False

    (low, low_open), (high, high_open) = bound("minimum"), bound("maximum")
    step = schema.get("multipleOf")
    if integer:
        first = math.floor(low) + 1 if low_open else math.ceil(low) if low > -math.inf else -math.inf
        last = math.ceil(high) - 1 if high_open else math.floor(high) if high < math.inf else math.inf
        value: float = min(max(1 + variant, first), last)
        if isinstance(step, (int, float)) and step > 0 and value % step:
            value = math.ceil(value / step) * step
            if value > last:
                value = math.floor(last / step) * step
        return int(value)
    value = 1 + variant
    if value < low or (low_open and value == low):
        value = low if not low_open else (low + high) / 2 if high < math.inf else low + 1
    if value > high or (high_open and value == high):
        value = high if not high_open else (low + high) / 2 if low > -math.inf else high - 1
    return value


_DIRECTORY = _words("dir dirs dirpath directory folder cwd workdir root")
_FILE = _words("path paths file files filepath filename")
_COMMAND = _words("command cmd commands script shell")
_PATTERN = _words("regex pattern query search keyword term glob")
_ANSWER = _words("result summary answer message reason")


def _string(schema: dict[str, Any], *, key: str, tool: _Tool, variant: int) -> str:
    """A harmless string for the field named ``key``, judged by its last part ("file_pattern" is a pattern,
    "filePath" a path, "description" neither a command nor anything else)."""
    parts = _parts(key)
    noun = parts[-1] if parts else ""
    fmt = schema.get("format")
    path = False
    if fmt in ("uri", "url") or noun in ("url", "uri"):
        text = "https://example.com"
    elif fmt == "date-time":
        text = "2024-01-01T00:00:00Z"
    elif fmt == "date":
        text = "2024-01-01"
    elif noun in _DIRECTORY or (
        noun in _FILE
        and (not tool.read_only or any(w in tool.name for w in ("list", "search", "glob", "find", "grep", "dir")))
    ):
        text, path = ".", True  # a directory: what a listing wants, and what no write or edit can overwrite
    elif noun in _FILE:
        text, path = "README.md", True  # a read-only tool reads the file every repository has
    elif noun in _COMMAND:
        text = "echo llmpod mock"
    elif noun in _PATTERN:
        text = "TODO"
    elif "question" in parts:
        text = "What should I do next?"
    elif noun in _ANSWER:
        text = "Done (an answer from the mock vLLM server)."
    else:
        text = "mock" if tool.read_only else ""  # nothing to write, post or launch
    if variant:  # the same place by another spelling for a path ("./."), else a number added
        text = "./" * variant + text if path else f"{text} {variant + 1}".strip()
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    if len(text) < low:
        text = ((text or "mock") * (low // max(len(text or "mock"), 1) + 1))[:low]
    if high is not None and len(text) > int(high):
        text = text[: int(high)] if not variant else str(variant + 1)[-int(high) :] if int(high) else ""
    return text
