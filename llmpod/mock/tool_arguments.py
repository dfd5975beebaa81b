"""The arguments the mock model calls a tool with: valid against the tool's JSON schema, and harmless (see the
rules in ``llmpod.mock.tools``, which picks the tool).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from llmpod.mock.tools import name_parts, safety, words

__all__ = ["arguments"]

_MAX_DEPTH = 6


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
        tool=_Tool(str(function["name"]).lower(), safety(tool) == 0),
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
            return next((v for v in enum if isinstance(v, str) and safety({"function": {"name": v}}) == 0), enum[0])
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


_DIRECTORY = words("dir dirs dirpath directory folder cwd workdir root")
_FILE = words("path paths file files filepath filename")
_COMMAND = words("command cmd commands script shell")
_PATTERN = words("regex pattern query search keyword term glob")
_ANSWER = words("result summary answer message reason")


def _string(schema: dict[str, Any], *, key: str, tool: _Tool, variant: int) -> str:
    """A harmless string for the field named ``key``, judged by its last part ("file_pattern" is a pattern,
    "filePath" a path, "description" neither a command nor anything else)."""
    parts = name_parts(key)
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
