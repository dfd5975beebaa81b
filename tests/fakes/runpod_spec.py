"""The official RunPod REST v2 OpenAPI spec (tests/fixtures/runpod-v2-openapi.json) as a validator for tests.

It tells whether a request as sent, and a response as received, keep the spec: the operation (method and path
template, e.g. ``GET /v2/pods/{id}``), its query parameters (coerced from text by their schema: integers,
booleans, ``style: form`` arrays), its JSON request body, and the response body against the schema of its
status code (errors are ``ErrorResponse`` problem+json), with the response headers the spec declares. Schemas
are JSON Schema 2020-12 (OpenAPI 3.1), checked with jsonschema-rs, formats (``date-time``) included.

Every check answers a list of one-line violations, empty when all is well. A value under ``env`` is never
quoted: it may hold a key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import jsonschema_rs

__all__ = ["SPEC_PATH", "Operation", "RunPodSpec", "sse_events"]

SPEC_PATH = Path(__file__).resolve().parents[1] / "fixtures" / "runpod-v2-openapi.json"
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
# getPodLogs' 200 is typed only as a string; its description and example say what each event is (runpod.md 8.5)
_LOG_EVENT = {
    "type": "object",
    "required": ["ts", "source", "line"],
    "additionalProperties": False,
    "properties": {
        "ts": {"type": "string", "format": "date-time"},
        "source": {"$ref": "#/components/schemas/LogSource"},
        "line": {"type": "string"},
    },
}


@dataclass(frozen=True)
class Operation:
    """One operation of the spec, with its path-level and own parameters resolved."""

    method: str  # upper case
    template: str  # /v2/pods/{id}
    regex: re.Pattern[str]
    spec: dict[str, Any]
    parameters: tuple[dict[str, Any], ...]

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


class RunPodSpec:
    """Checks of requests and responses against the spec (by default the vendored copy)."""

    def __init__(self, document: dict[str, Any] | None = None) -> None:
        self.document = document if document is not None else json.loads(SPEC_PATH.read_text())
        self._validators: dict[str, Any] = {}
        self.operations = self._operations()

    # --- the spec's own structure -----------------------------------------------------------------------
    def resolve(self, node: Any) -> Any:
        """``node`` with its ``$ref`` followed (again while the target is a ``$ref`` too)."""
        seen: set[str] = set()
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if not ref.startswith("#/") or ref in seen:
                raise ValueError(f"cannot resolve $ref {ref!r}")
            seen.add(ref)
            node = self.document
            for part in ref[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def _operations(self) -> list[Operation]:
        found = []
        for template, item in self.document["paths"].items():
            shared = [self.resolve(p) for p in item.get("parameters", [])]
            for method in _METHODS:
                if method not in item:
                    continue
                spec = item[method]
                own = [self.resolve(p) for p in spec.get("parameters", [])]
                names = {(p["name"], p["in"]) for p in own}
                params = tuple([p for p in shared if (p["name"], p["in"]) not in names] + own)
                pattern = "".join(
                    f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") else re.escape(part)
                    for part in re.split(r"(\{[^}/]+\})", template)
                )
                found.append(Operation(method.upper(), template, re.compile(pattern + "$"), spec, params))
        # a literal segment wins over a template (/v2/registries/delegations over /v2/registries/{id})
        return sorted(found, key=lambda op: op.template.count("{"))

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        """The operation for ``method`` and ``path`` as sent (percent-encoded: an id may hold a ``/``), and its
        path parameters, decoded."""
        for operation in self.operations:
            if operation.method == method.upper() and (found := operation.regex.match(path)):
                return operation, {name: unquote(value) for name, value in found.groupdict().items()}
        return None

    # --- schemas ----------------------------------------------------------------------------------------
    def schema_errors(self, schema: dict[str, Any], instance: Any, where: str) -> list[str]:
        """``instance`` against ``schema`` (which may ``$ref`` the spec's components)."""
        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            root = {"allOf": [schema], "components": self.document["components"]}
            validator = self._validators[key] = jsonschema_rs.validator_for(root, validate_formats=True)
        found = list(validator.iter_errors(instance))
        errors = []
        for error in found:
            if type(error.kind).__name__ == "UnevaluatedProperties" and any(
                list(other.instance_path[: len(error.instance_path)]) == list(error.instance_path)
                and len(other.instance_path) > len(error.instance_path)
                for other in found
            ):
                continue  # a property that failed counts as unevaluated too (2020-12): the failure says it all
            path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.instance_path)
            if "env" in error.instance_path:  # a pod's env holds its keys: say what failed, never the value
                errors.append(f"{path}: fails the spec's {type(error.kind).__name__} rule (value not shown)")
            else:
                errors.append(f"{path}: {_short(error.message)}")
        return errors

    def _coerce(self, schema: dict[str, Any], text: str) -> Any:
        """A query or header value as the JSON value its schema wants, when it reads as one."""
        kinds = self.resolve(schema).get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if "integer" in kinds and re.fullmatch(r"-?\d+", text):
            return int(text)
        if "number" in kinds and re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text):
            return float(text)
        if "boolean" in kinds and text in ("true", "false"):
            return text == "true"
        return text

    def _parameter_errors(self, param: dict[str, Any], values: list[str]) -> list[str]:
        where, schema = f"{param['in']} {param['name']}", param.get("schema", {})
        if self.resolve(schema).get("type") == "array":
            explode = param.get("explode", param.get("style", "form") == "form")
            if not explode and len(values) > 1:
                return [f"{where}: given {len(values)} times; the spec wants one comma-separated value"]
            items = values if explode else values[0].split(",")
            item_schema = self.resolve(schema).get("items", {})
            value: Any = [self._coerce(item_schema, item) for item in items]
        elif len(values) > 1:
            return [f"{where}: given {len(values)} times"]
        else:
            value = self._coerce(schema, values[0])
        return self.schema_errors(schema, value, where)

    # --- requests ---------------------------------------------------------------------------------------
    def request_errors(
        self, method: str, path: str, query: str | bytes = "", body: bytes = b"", content_type: str | None = None
    ) -> list[str]:
        """What is wrong with a request as sent: unknown operation, query parameters, JSON body."""
        matched = self.match(method, path)
        if matched is None:
            return [f"{method.upper()} {path}: no such operation in the spec"]
        operation, path_values = matched
        query_text = query.decode("latin-1") if isinstance(query, bytes) else query
        given: dict[str, list[str]] = {}
        for name, value in parse_qsl(query_text, keep_blank_values=True):
            given.setdefault(name, []).append(value)
        errors: list[str] = []
        declared = {p["name"] for p in operation.parameters if p["in"] == "query"}
        errors += [f"query {name}: not a parameter of {operation}" for name in given if name not in declared]
        for param in operation.parameters:
            if param["in"] == "path":
                errors += self._parameter_errors(param, [path_values[param["name"]]])
            elif param["in"] == "query":
                if param["name"] in given:
                    errors += self._parameter_errors(param, given[param["name"]])
                elif param.get("required"):
                    errors.append(f"query {param['name']}: required by {operation}")
        errors += self._body_errors(operation, body, content_type)
        return [f"{operation}: {error}" for error in errors]

    def _body_errors(self, operation: Operation, body: bytes, content_type: str | None) -> list[str]:
        declared = self.resolve(operation.spec.get("requestBody"))
        if declared is None:
            return ["a request body, where the spec has none"] if body.strip() else []
        if not body.strip():
            return ["no request body, where the spec requires one"] if declared.get("required") else []
        media = _media_type(content_type)
        content = declared.get("content", {})
        if media not in content:
            return [f"request body sent as {media or 'no content type'}, the spec takes {', '.join(content)}"]
        try:
            value = json.loads(body)
        except ValueError:
            return ["request body is not JSON"]
        return self.schema_errors(content[media].get("schema", {}), value, "body $")

    # --- responses --------------------------------------------------------------------------------------
    def declared_response(self, operation: Operation, status: int) -> dict[str, Any] | None:
        responses = operation.spec.get("responses", {})
        found = responses.get(str(status)) or responses.get(f"{status // 100}XX") or responses.get("default")
        return self.resolve(found) if found is not None else None

    def response_errors(
        self,
        method: str,
        path: str,
        status: int,
        content_type: str | None,
        body: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """What is wrong with a whole response: its status, content type, body and declared headers."""
        matched = self.match(method, path)
        if matched is None:
            return [f"{method.upper()} {path}: no such operation in the spec"]
        operation = matched[0]
        declared = self.declared_response(operation, status)
        if declared is None:
            return [f"{operation} -> {status}: a status the spec does not document"]
        errors = self.header_errors(declared, headers or {})
        content = declared.get("content")
        media = _media_type(content_type)
        if not content:
            errors += [f"a body, where the spec has none: {_short(body.decode(errors='replace'))}"] if body else []
        elif media not in content:
            errors.append(f"content type {media or 'none'}, the spec says {', '.join(content)}")
        elif media == "text/event-stream":
            events, rest = sse_events(body.decode(errors="replace"))
            errors += [e for event in events for e in self.log_event_errors(event)]
            errors += [f"an unfinished event at the end: {_short(rest)}"] if rest.strip() else []
        elif media.endswith("json"):
            try:
                value = json.loads(body)
            except ValueError:
                errors.append(f"body is not JSON: {_short(body.decode(errors='replace'))}")
            else:
                errors += self.schema_errors(content[media].get("schema", {}), value, "body $")
                if media == "application/problem+json" and isinstance(value, dict) and value.get("status") != status:
                    errors.append(f"body $.status: {value.get('status')!r}, but the HTTP status is {status}")
        return [f"{operation} -> {status}: {error}" for error in errors]

    def header_errors(self, declared: dict[str, Any], headers: Mapping[str, str]) -> list[str]:
        """The response headers the spec declares, where present (``Retry-After`` is an integer...)."""
        present = {name.lower(): value for name, value in headers.items()}
        errors = []
        for name, header in declared.get("headers", {}).items():
            value = present.get(name.lower())
            if value is not None:
                schema = self.resolve(header).get("schema", {})
                errors += self.schema_errors(schema, self._coerce(schema, value), f"header {name}")
        return errors

    def log_event_errors(self, event: str) -> list[str]:
        """One event of a pod log stream: an ``id:`` and a JSON ``data:`` of ``ts``, ``source``, ``line``."""
        fields: dict[str, list[str]] = {}
        for line in event.split("\n"):
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        if set(fields) - {"id", "data", ""} or len(fields.get("id", [])) != 1 or not fields.get("data"):
            return [f"log event is not one id: and data: lines: {_short(event)}"]
        try:
            data = json.loads("\n".join(fields["data"]))
        except ValueError:
            return [f"log event data is not JSON: {_short(event)}"]
        errors = self.schema_errors(_LOG_EVENT, data, "log event data $")
        # "Log-event id values are the event ts timestamp" (its example adds a /sequence suffix)
        if not errors and fields["id"][0].split("/", 1)[0] != data["ts"]:
            errors.append(f"log event id {fields['id'][0]!r} does not start with its ts {data['ts']!r}")
        return errors


def sse_events(text: str) -> tuple[list[str], str]:
    """The complete events of an SSE text (blank-line separated), and what is left after the last one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    *events, rest = text.split("\n\n")
    return [event for event in events if event.strip()], rest


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_all(spec: RunPodSpec, requests: Iterable[tuple[str, str, str, bytes, str | None]]) -> list[str]:
    """Request violations of many requests: (method, path, query, body, content type) each."""
    return [
        error
        for method, path, query, body, ctype in requests
        for error in spec.request_errors(method, path, query, body, ctype)
    ]
