"""How pod_config.json problems are told: JSON read strictly (no duplicate keys, NaN or comments, with a hint for
the usual hand-editing slips) and pydantic's errors turned into ``key=value what is wrong``, never echoing a secret.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from typing import Any

from llmpod.errors import ConfigError

__all__ = ["describe", "json_type", "parse_json", "short", "suggest_key"]

# names people reach for that difflib cannot tie to ours
KEY_ALIASES = {
    "model": "modelStoreId",
    "model_id": "modelStoreId",
    "model_store_id": "modelStoreId",
    "gpu": "gpu_type_id",
    "gpu_type": "gpu_type_id",
    "gpu_id": "gpu_type_id",
    "gputypeid": "gpu_type_id",
    "templateid": "template_id",
    "port": "proxy_port",
    "runtime": "runtime_seconds",
    "image_name": "image",
    "imagename": "image",
    "disk": "container_disk_gb",
    "containerdiskingb": "container_disk_gb",
    "cloud": "cloud_type",
    "cloudtype": "cloud_type",
    "hf_token": "hf_token_env",
    "max_cost": "max_hourly_cost",
}
_TOKEN = re.compile(r"\b(hf_|rpa_|sk-)[A-Za-z0-9_\-]{6,}")  # Hugging Face, RunPod, OpenAI-style keys
_MAX_REPR = 60
_TYPE_WORDS = {
    "int": "is not an integer",
    "float": "is not a number",
    "bool": "is not true or false",
    "string": "is not a string",
    "list": "is not a list",
    "dict": "is not an object",
}


class _NotPlainJson(Exception):
    """Valid to ``json.loads`` but not to a person reading the file: a repeated key, NaN or Infinity."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _NotPlainJson(f"key {key} appears more than once; keep one")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise _NotPlainJson(f"{name} is not a JSON number; write a plain number")


def parse_json(name: str, text: str) -> Any:
    """``json.loads`` with a one-line ``ConfigError`` (line, column and a hint) for anything JSON does not allow,
    including duplicate keys and NaN/Infinity."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        what = exc.msg.removesuffix(" starting at")
        raise ConfigError(
            f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {what}{_json_hint(text, exc.pos)}"
        ) from None
    except _NotPlainJson as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{name}: is nested too deeply to be a config file") from None


def _json_hint(text: str, pos: int) -> str:
    rest = text[pos:].lstrip()
    before = text[:pos].rstrip()
    if rest.startswith(("//", "/*", "#")):
        return " (JSON has no comments: see README.md for what each key means)"
    if rest.startswith(("True", "False", "None")):
        return " (JSON writes true, false and null in lower case)"
    if rest.startswith("'"):
        return " (JSON strings use double quotes)"
    if before.endswith(",") and rest[:1] in ("}", "]"):
        return " (JSON allows no comma before a closing bracket)"
    if not rest:
        return " (the file ends too early: is it cut short?)"
    return ""


def suggest_key(key: str, fields: Iterable[str]) -> str:
    """A hint for an unknown key: the field it resembles, or where the keys are listed."""
    folded = key.casefold().replace("-", "_")
    by_fold = {field.casefold(): field for field in fields}
    if folded in by_fold:
        return f" (did you mean {by_fold[folded]}?)"
    if folded in KEY_ALIASES or folded.replace("_", "") in KEY_ALIASES:
        return f" (did you mean {KEY_ALIASES.get(folded) or KEY_ALIASES[folded.replace('_', '')]}?)"
    close = difflib.get_close_matches(folded, list(by_fold), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {by_fold[close[0]]}?)"
    return " (see README.md for the keys pod_config.json may hold)"


def describe(error: Any) -> str:
    """One pydantic error as ``key=value what is wrong``, with the value left out where it may be a secret."""
    loc = error["loc"]
    key = str(loc[0]) if loc else "?"
    for part in loc[1:]:
        key += f"[{part!r}]" if part != "[key]" else ""
    value = error.get("input")
    kind = str(error["type"])
    ctx = error.get("ctx") or {}
    if kind.split("_")[0] in _TYPE_WORDS and kind.endswith(("_type", "_parsing", "_from_float")):
        what = _TYPE_WORDS[kind.split("_")[0]]
        if key in ("template_id", "max_model_len", "max_hourly_cost", "command", "min_cuda_version"):
            what += " or null"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        limit = next(iter(ctx.values()))
        words = {
            "greater_than_equal": "at least",
            "greater_than": "more than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }
        what = f"must be {words[kind]} {limit}"
    elif kind == "literal_error":
        what = f"must be {ctx.get('expected', '')}"
    elif kind in ("string_too_short", "too_short"):
        what = "must not be empty"
    else:
        what = str(error["msg"]).removeprefix("Value error, ")
        if isinstance(value, (list, dict)):  # our own checks name the bad item themselves
            return f"{key} {what}"
    if key == "env" or key.startswith("env[") or (key == "hf_token_env" and _looks_secret(value)):
        return f"{key} {what}"  # may be a secret: never echoed
    return f"{key}={short(value)} {what}"


def _looks_secret(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("hf_") or len(value) >= 24)


def short(value: Any) -> str:
    """``repr(value)`` cut to a readable length, with anything shaped like a token hidden."""
    text = _TOKEN.sub(lambda match: match.group(1) + "***", repr(value))
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)
