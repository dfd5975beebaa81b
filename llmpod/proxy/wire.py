"""Wire shapes the proxy owns: the OpenAI error body, and the JSON of /health and /debug/cache.

Every error the proxy answers with, its own or an upstream's, has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` that the openai SDKs, the Vercel AI SDK (current Kilo
Code) and legacy Kilo Code all parse (reference: proxy_anchors.md section 4).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import Response

STATUS_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    502: "BadGatewayError",
    504: "GatewayTimeoutError",
}


def error_type_for(status: int) -> str:
    return STATUS_TYPES.get(status, "InternalServerError" if status >= 500 else "APIError")


def error_body(
    message: str, status: int, *, type: str | None = None, param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """The OpenAI error body. ``code`` defaults to the status, as vLLM does."""
    return {
        "error": {
            "message": message,
            "type": type or error_type_for(status),
            "param": param,
            "code": status if code is None else code,
        }
    }


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(
    message: str,
    status: int,
    *,
    type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return json_response(error_body(message, status, type=type, param=param), status, headers)


def normalise_error(status: int, payload: Any, fallback_text: str = "") -> dict[str, Any]:
    """Turn any upstream error payload into the OpenAI shape, keeping its message, type and param.

    Handles vLLM >= 0.10.1 (nested), vLLM < 0.10.1 (flat ``{"object": "error", ...}``), vLLM's auth
    failure (``{"error": "Unauthorized"}``), FastAPI's ``{"detail": ...}`` and plain text.
    """
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            source = inner
        elif isinstance(inner, str):
            source = {"message": inner}
        elif payload.get("object") == "error" or "message" in payload:
            source = payload
        elif "detail" in payload:
            detail = payload["detail"]
            source = {"message": detail if isinstance(detail, str) else orjson.dumps(detail).decode()}
        else:
            source = {"message": orjson.dumps(payload).decode()[:500]}
    else:
        source = {"message": fallback_text.strip()[:500] or f"upstream answered HTTP {status}"}
    message = source.get("message")
    return error_body(
        message if isinstance(message, str) and message else f"upstream answered HTTP {status}",
        status,
        type=source.get("type") if isinstance(source.get("type"), str) else None,
        param=source.get("param") if isinstance(source.get("param"), str) else None,
        code=source.get("code"),
    )


class UpstreamHealth(BaseModel):
    url: str
    reachable: bool
    status_code: int | None = None
    latency_ms: float | None = None
    models: list[str] = []
    kind: str | None = None  # mock or vllm (llmpod/server_kind.py): the kind cached answers are looked up as
    error: str | None = None


class HealthReport(BaseModel):
    status: str  # "healthy" | "degraded"
    reason: str | None = None
    endpoint: str
    cache_dir: str
    uptime: float
    upstream: UpstreamHealth
    cache_loading: bool = False  # the start-up scan is still indexing entries (they are served meanwhile)


class CacheEntrySummary(BaseModel):
    key: str
    kind: str | None  # the kind of server that answered (the key names it); None: written before it was keyed
    model: str | None
    endpoint: str | None
    preview: str
    size: int
    created: float
    hits: int
    last_hit: float | None
    key_rules: list[str] = []  # the key rules that took volatile parts out of its key


class CacheListing(BaseModel):
    total: int
    offset: int
    limit: int
    entries: list[CacheEntrySummary]


# The request bodies of the two generation routes, for the OpenAPI schema (/docs, and fuzzing from it). Documentation
# only: the proxy forwards any JSON object and vLLM judges it, so these list what matters and allow anything else.
_MODEL = {"type": "string", "description": "a served id, its Hugging Face repo id, or a short name (README)"}
_SAMPLING: dict[str, Any] = {
    "model": _MODEL,
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1, "description": "lowered to fit the context"},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1},
    "seed": {"type": "integer"},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
    "cache": {
        "type": "object",
        "description": "LiteLLM's per-request cache controls: no-cache, no-store",
        "properties": {"no-cache": {"type": "boolean"}, "no-store": {"type": "boolean"}},
    },
}
CHAT_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": True,
    "properties": {
        **_SAMPLING,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "additionalProperties": True,
                "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": {
                        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]
                    },
                },
            },
        },
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"anyOf": [{"type": "string"}, {"type": "object"}]},
        "response_format": {"type": "object"},
    },
}
COMPLETION_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": True,
    "properties": {
        **_SAMPLING,
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
            ]
        },
    },
}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
