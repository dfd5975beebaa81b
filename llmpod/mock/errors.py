"""vLLM 0.33.0's error answers, for the mock: the JSON body, and the messages its validation layers write
(vllm/exceptions.py VLLMValidationError, vllm/entrypoints/serve/exception_handling/handlers/validation.py for
FastAPI's body validation, vllm/entrypoints/serve/exception_handling/error_response.py)."""

from __future__ import annotations

import json
from typing import Any, Literal

WireFormat = Literal["modern", "legacy"]


class APIError(Exception):
    """A request the server refuses; rendered as vLLM's error body with ``status`` as the HTTP code."""

    def __init__(
        self,
        status: int,
        err_type: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None) -> APIError:
    """A 400 ``BadRequestError``, the status vLLM uses for every validation failure."""
    return APIError(400, "BadRequestError", message, param)


def vllm_validation(message: str, parameter: str | None = None, value: Any = None) -> APIError:
    """vLLM's ``VLLMValidationError``: its ``str()`` appends ``(parameter=P, value=V)`` (vllm/exceptions.py)."""
    extras = [f"{k}={v}" for k, v in (("parameter", parameter), ("value", value)) if v is not None]
    return bad_request(f"{message} ({', '.join(extras)})" if extras else message, parameter)


def _summarize_input(value: Any) -> Any:
    # as vllm/entrypoints/serve/exception_handling/handlers/validation.py:_summarize_error_input
    if isinstance(value, str):
        return value[:200] + "...[truncated]" if len(value) > 200 else value
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text[:200] + "...[truncated]" if len(text) > 200 else text


def request_validation_error(errors: list[Any]) -> APIError:
    """FastAPI's ``RequestValidationError`` as vLLM 0.33 renders it: a 400 of type "Bad Request", the message
    ``N validation error(s):`` and one line per error, ``param`` the first error's dotted location."""
    lines, param = [], None
    for error in errors[:10]:
        if isinstance(error, dict):  # in pydantic's key order, which the message shows
            error = {k: error[k] for k in ("type", "loc", "msg", "input", "ctx") if k in error}
            if "input" in error:
                error["input"] = _summarize_input(error["input"])
            error["loc"] = ".".join(str(p) for p in error.get("loc", ()))
            param = param if param is not None else error["loc"] or None
        text = str(error)
        lines.append(f"  {text[:1000] + '...[truncated]' if len(text) > 1000 else text}\n")
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(lines)
    if len(errors) > 10:
        message += f"  ...and {len(errors) - 10} more {label}\n"
    return APIError(400, "Bad Request", message.rstrip(), param)


def json_decode_error(exc: json.JSONDecodeError) -> APIError:
    """What FastAPI reports for a body that is not JSON (the position is where the parser gave up)."""
    return request_validation_error(
        [
            {
                "type": "json_invalid",
                "loc": ("body", exc.pos),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
        ]
    )


def error_body(err: APIError, wire_format: WireFormat) -> dict[str, Any]:
    """vLLM's error JSON: nested since v0.10.1 ("modern"), flat before ("legacy", where param was null)."""
    if wire_format == "legacy":  # whose body validation errors were BadRequestError too
        err_type = "BadRequestError" if err.err_type == "Bad Request" else err.err_type
        return {"object": "error", "message": err.message, "type": err_type, "param": None, "code": err.status}
    return {"error": {"message": err.message, "type": err.err_type, "param": err.param, "code": err.status}}
