"""Reading a generation request: its JSON body within the size limit, its per-request cache controls, and the
preview of it that /debug/cache shows. Problems are ``RequestProblem``: an HTTP status and an OpenAI error."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

PREVIEW_WORDS = 12

__all__ = ["PREVIEW_WORDS", "RequestProblem", "cache_controls", "preview", "read_json_body"]


class RequestProblem(Exception):
    """The client's request is unusable; answered with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


async def read_json_body(request: Request, limit: int) -> tuple[dict[str, Any], int]:
    """The body as a JSON object, and its size in bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestProblem(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise RequestProblem(413, f"request body is larger than the proxy's limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise RequestProblem(413, f"request body is larger than the proxy's limit of {limit} bytes")
            parts.append(part)
    except ClientDisconnect:
        # a client that hung up mid-body (or sent less than its Content-Length): nobody reads this answer
        raise RequestProblem(499, "the client closed the connection before sending the whole body") from None
    try:
        body = orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError as exc:
        raise RequestProblem(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestProblem(400, "request body must be a JSON object")
    return body, size


def cache_controls(request: Request, body: dict[str, Any]) -> tuple[bool, bool]:
    """(no_cache, no_store) from ``Cache-Control`` and LiteLLM's body field ``cache``, which is removed."""
    directives = {d.strip().lower() for d in request.headers.get("cache-control", "").split(",")}
    no_cache = "no-cache" in directives
    no_store = "no-store" in directives
    field = body.pop("cache", None)
    if isinstance(field, dict):
        no_cache = no_cache or field.get("no-cache") is True
        no_store = no_store or field.get("no-store") is True
    return no_cache, no_store


def preview(endpoint: str, body: dict[str, Any]) -> str:
    """The first words of the last user message (or of the prompt), for /debug/cache."""
    text: Any = ""
    if endpoint == "chat.completions":
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                text = message.get("content")
                break
        if isinstance(text, list):  # content parts
            text = " ".join(str(p.get("text") or "") for p in text if isinstance(p, dict))
    else:
        text = body.get("prompt")
        if isinstance(text, list) and text:
            text = text[0]
    return " ".join(str(text or "").split()[:PREVIEW_WORDS])[:200]
