"""A mock of vLLM's OpenAI-compatible HTTP server, for tests, benchmarks and ``manage_pod.py --local``.

``create_app(MockSettings(...))`` returns a FastAPI app with its own state and Prometheus registry. It
answers like vLLM 0.33.0, the release the pods run (checked against vLLM's own server by the fidelity tier,
tests/fidelity/), or like v0.10.0 and older with ``wire_format="legacy"`` (flat errors,
``reasoning_content``). Tool calls need ``enable_auto_tool_choice`` and ``tool_call_parser``, as in vLLM
(llmpod/mock/tools.py says which tool and which arguments). Faults are
switches: latency, injected 500s and 429s, a connection cut mid-stream, a dead engine, and streams that break
the protocol (an event that is not JSON, events run together, no ``[DONE]``, a stream that stalls), which a
real vLLM should never send but a proxy in front of one must survive.

Test-only routes, outside ``/v1`` so the API key never guards them:

- ``GET /mock/stats``: ``{"requests": {"chat.completions", "completions", "models", "health", "tokenize",
  "version", "metrics": N}, "streams": N, "injected": {"500", "429", "cut", "invalid_json", "malformed_sse",
  "no_done", "stall": N}, "errors": {"<status>": N},
  "in_flight": N, "max_in_flight": N, "last_request": {"path", "body", "headers"} | null}``. A generation
  request counts once it reaches its handler, whatever the answer; ``errors`` counts error answers.
- ``POST /mock/config``: a partial settings object, applied live; answers the effective settings (the API
  key masked as pydantic masks it). ``served_model_name: null`` means "the same as model".
- ``POST /mock/reset``: zero the statistics and reseed the fault RNG.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from llmpod.mock import errors, shapes
from llmpod.mock.faults import ConnectionCut, CutBody, install_log_filter
from llmpod.mock.generation import Output, generate
from llmpod.mock.kind import KindMarkMiddleware
from llmpod.mock.requests import ParsedRequest, check_render, parse_chat, parse_completion, validate_messages
from llmpod.mock.state import MockSettings, MockState, StreamFault
from llmpod.mock.state import json_response as _json
from llmpod.mock.tokens import chat_prompt_ids, text_ids
from llmpod.sse_response import EventStream

VLLM_VERSION = shapes.VLLM_VERSION
METRICS_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"  # what vLLM 0.33's prometheus_client sends
_MASK = "**********"  # how pydantic shows a SecretStr, and so how /mock/config shows the key
STALL_SECONDS = 300.0  # a stalled stream goes quiet this long (a client or proxy timeout ends it sooner)
log = logging.getLogger("llmpod.mock.server")


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


class _ApiKeyMiddleware:
    """vLLM's ``--api-key`` check (vllm/entrypoints/serve/middleware/authenticate.py, 0.33.0): only paths under
    /v1, any-case "Bearer" and the key after one space exactly; 401 ``{"error":"Unauthorized"}`` otherwise."""

    def __init__(self, app: ASGIApp, mock: MockState) -> None:
        self.app = app
        self.mock = mock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.mock.settings.api_key
        if (
            scope["type"] == "http"
            and key is not None
            and scope["method"] != "OPTIONS"
            and scope["path"].startswith("/v1")
            and not _authorized(scope, key.get_secret_value())
        ):
            await _json({"error": "Unauthorized"}, status=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _authorized(scope: Scope, key: str) -> bool:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    # Comparing digests keeps the time independent of where, and whether, the lengths differ.
    expected, given = hashlib.sha256(key.encode()).digest(), hashlib.sha256(token.encode()).digest()
    return scheme.lower() == "bearer" and hmac.compare_digest(expected, given)


async def _read_json(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":  # vllm/entrypoints/serve/utils/api_utils.py:validate_json_request
        raise errors.request_validation_error(["Unsupported Media Type: Only 'application/json' is allowed"])
    raw = await request.body()
    try:
        # The standard parser, as in vLLM: orjson would turn integers beyond 64 bits into floats.
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise errors.json_decode_error(exc) from None
    except UnicodeDecodeError:
        raise errors.json_decode_error(json.JSONDecodeError("Invalid UTF-8", "", 0)) from None


def create_app(settings: MockSettings) -> FastAPI:
    """A FastAPI app that behaves like vLLM's OpenAI-compatible server, with its own state and metrics."""
    install_log_filter()
    mock = MockState(settings)
    app = FastAPI(title="vLLM mock", version=VLLM_VERSION)
    app.add_middleware(_ApiKeyMiddleware, mock=mock)
    app.add_middleware(KindMarkMiddleware, mock=mock)  # added last: outermost, so the 401 is marked too
    app.state.mock = mock

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"])
    async def health() -> Response:
        mock.requests["health"] += 1
        return Response(status_code=503 if mock.settings.dead else 200)

    @app.get("/version")
    async def version() -> Response:
        mock.requests["version"] += 1
        return _json({"version": VLLM_VERSION})

    @app.get("/v1/models")
    async def models() -> Response:
        mock.requests["models"] += 1
        s, created = mock.settings, int(time.time())
        permission = {
            "id": f"modelperm-{secrets.token_hex(8)}",
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": s.served_name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": s.model,
            "parent": None,
            "max_model_len": s.max_model_len,
            "permission": [permission],
        }
        return _json({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        mock.requests["metrics"] += 1
        mock.update_gauges()  # so the gauges exist from the first scrape
        return Response(generate_latest(mock.metrics.registry), media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        mock.requests["tokenize"] += 1
        try:
            body = await _read_json(request)
            if not isinstance(body, dict):
                raise errors.bad_request("Input should be a valid dictionary or object to extract fields from")
            if "messages" in body:
                ids = chat_prompt_ids(validate_messages(body["messages"]))
            elif isinstance(body.get("prompt"), str):
                ids = text_ids(body["prompt"])
            else:  # vLLM 0.33's TokenizeRequest is a union of the prompt and the messages form
                missing = {"type": "missing", "msg": "Field required", "input": body}
                raise errors.request_validation_error(
                    [{**missing, "loc": ("body", "prompt")}, {**missing, "loc": ("body", "messages")}]
                )
            mock.check_model(body.get("model"))
        except errors.APIError as err:
            return mock.error_response(err)
        return _json(
            {"count": len(ids), "max_model_len": mock.settings.max_model_len, "tokens": ids, "token_strs": None}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(mock, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(mock, request, "completion")

    @app.get("/mock/stats")
    async def mock_stats() -> Response:
        return _json(mock.stats())

    @app.post("/mock/config")
    async def mock_config(request: Request) -> Response:
        try:
            patch = await _read_json(request)
            if not isinstance(patch, dict):
                raise errors.bad_request("expected a JSON object of settings")
            if patch.get("api_key") == _MASK:  # our own answer posted back: keep the key
                del patch["api_key"]
            new = MockSettings.model_validate({**mock.settings.model_dump(), **patch})
        except errors.APIError as err:
            return mock.error_response(err, counted=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = f"{where}: {first['msg']}" if where else str(first["msg"]).removeprefix("Value error, ")
            return mock.error_response(errors.bad_request(message, where or None), counted=False)
        if new.seed != mock.settings.seed:
            mock.rng.seed(new.seed)
        mock.settings = new
        log.info("mock vLLM settings changed: %s", sorted(patch))
        return _json(new.model_dump(mode="json"))

    @app.post("/mock/reset")
    async def mock_reset() -> Response:
        mock.reset()
        return _json(mock.stats())

    return app


async def _generate(mock: MockState, request: Request, kind: Literal["chat", "completion"]) -> Response:
    settings = mock.settings  # one request sees one configuration, even if /mock/config changes it
    mock.requests["chat.completions" if kind == "chat" else "completions"] += 1
    try:
        body = await _read_json(request)
        mock.last_request = {"path": request.url.path, "body": body, "headers": _safe_headers(request)}
        req = parse_chat(body) if kind == "chat" else parse_completion(body)
        mock.check_model(req.model)
        check_render(req, max_model_len=settings.max_model_len, tool_parser=settings.tool_parser)
        mock.inject_fault()
    except errors.APIError as err:
        return mock.error_response(err)
    outputs = generate(
        req,
        chunk_count=settings.chunk_count,
        reasoning=settings.reasoning,
        max_model_len=settings.max_model_len,
        tool_parser=settings.tool_parser,
    )
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    response_id = prefix + (request.headers.get("x-request-id") or secrets.token_hex(8))
    created = int(time.time())
    fingerprint = shapes.system_fingerprint(settings.model, settings.max_model_len)
    if req.stream:
        mock.streams += 1
        steps, tail = shapes.stream_chunks(
            req,
            outputs,
            response_id=response_id,
            created=created,
            model=settings.served_name,
            wire_format=settings.wire_format,
            fingerprint=fingerprint,
            parser=settings.tool_parser is not None,
        )
        fault = mock.pick_stream_fault(settings)
        return EventStream(_stream(mock, settings, req, outputs, steps, tail, fault), media_type="text/event-stream")
    tokens = sum(len(p.ids) for p in req.prompts)
    mock.begin(tokens)
    try:
        seconds = settings.first_token_delay + settings.chunk_delay * (max(o.steps for o in outputs) - 1)
        finished = await _sleep_unless_disconnected(request, seconds)
    finally:
        mock.end(tokens)
    if not finished:  # vLLM aborts a request whose client went away; nobody reads this answer
        mock.metrics.success.labels(**mock.labels(), finished_reason="abort").inc()
        return Response(status_code=499)
    payload = orjson.dumps(
        shapes.response_body(
            req,
            outputs,
            response_id=response_id,
            created=created,
            model=settings.served_name,
            wire_format=settings.wire_format,
            fingerprint=fingerprint,
        )
    )
    if settings.die_after_chunks is not None:
        mock.injected["cut"] += 1
        log.warning("mock vLLM: cutting a non-streaming response (die_after_chunks)")
        return StreamingResponse(
            CutBody(), media_type="application/json", headers={"content-length": str(len(payload))}
        )
    mock.finished(req, outputs)
    return Response(payload, media_type="application/json")


async def _stream(
    mock: MockState,
    settings: MockSettings,
    req: ParsedRequest,
    outputs: list[Output],
    steps: list[list[dict[str, Any]]],
    tail: list[dict[str, Any]],
    fault: StreamFault | None = None,
) -> AsyncGenerator[bytes, None]:
    events = [[_event(chunk) for chunk in step] for step in steps]
    events.append([*(_event(chunk) for chunk in tail), _event("[DONE]")])
    tokens = sum(len(p.ids) for p in req.prompts)
    sent, outcome = 0, "abort"  # unless it completes or we cut it, the client went away
    mock.begin(tokens)
    pending: list[bytes] = []  # events no delay separates go out in one write, as a real server's would
    try:
        for number, step in enumerate(events):
            delay = 0.0
            if number < len(steps):
                delay = settings.first_token_delay if number == 0 else settings.chunk_delay
            if delay > 0:
                if pending:
                    yield b"".join(pending)
                    pending = []
                await _sleep(delay)
            for event in step:
                if settings.die_after_chunks is not None and sent >= settings.die_after_chunks:
                    if pending:
                        yield b"".join(pending)  # what was "sent" before the cut reaches the client
                    mock.injected["cut"] += 1
                    outcome = "cut"
                    log.warning("mock vLLM: cutting a stream after %d data events (die_after_chunks)", sent)
                    raise ConnectionCut("mock vLLM cut the connection (die_after_chunks)")
                if fault is not None and sent == settings.stream_fault_after:
                    mock.injected[fault] += 1
                    log.warning("mock vLLM: breaking a stream after %d data events (stream_fault=%s)", sent, fault)
                    if fault in ("no_done", "stall"):
                        outcome = "cut"
                        if pending:
                            yield b"".join(pending)
                        if fault == "stall":
                            await _sleep(STALL_SECONDS)
                        return  # the response ends cleanly, without the rest or [DONE]
                    # a broken event, then the rest of the stream as if nothing happened
                    event = event[: len(event) // 2] + b"\n\n" if fault == "invalid_json" else event[:-1]
                    fault = None
                pending.append(event)
                sent += 1
        if pending:
            yield b"".join(pending)
        outcome = "done"
        mock.finished(req, outputs)
    finally:
        mock.end(tokens)
        if outcome == "abort":
            mock.metrics.success.labels(**mock.labels(), finished_reason="abort").inc()


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


async def _sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Wait ``seconds``; False as soon as the client disconnects (Starlette only notices that for streams)."""
    if seconds <= 0:
        return True
    gone = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({gone}, timeout=seconds)
    gone.cancel()
    return not done


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _safe_headers(request: Request) -> dict[str, str]:
    return {k: ("<redacted>" if k == "authorization" else v) for k, v in request.headers.items()}
