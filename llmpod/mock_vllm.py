"""A mock of vLLM's OpenAI-compatible HTTP server, for tests, benchmarks and ``manage_pod.py --local``.

``create_app(MockSettings(...))`` returns a FastAPI app with its own state and Prometheus registry. It
answers like vLLM 0.33.0, the release the pods run (checked against vLLM's own server by the fidelity tier,
tests/fidelity/), or like v0.10.0 and older with ``wire_format="legacy"`` (flat errors,
``reasoning_content``). Tool calls need ``enable_auto_tool_choice`` and ``tool_call_parser``, as in vLLM
(llmpod/mock_tools.py says which tool and which arguments). Faults are
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
import random
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from llmpod import mock_generation as gen
from llmpod import mock_shapes as shapes
from llmpod import mock_tools
from llmpod.streaming import EventStream

VLLM_VERSION = shapes.VLLM_VERSION
METRICS_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"  # what vLLM 0.33's prometheus_client sends
ENGINE_DEAD_MESSAGE = "The server had an error while processing your request."  # EngineDeadError.CLIENT_MESSAGE
_MASK = "**********"  # how pydantic shows a SecretStr, and so how /mock/config shows the key
_KV_CACHE_SEQUENCES = 16  # the mock's KV cache holds this many full-length sequences
_KINDS = ("chat.completions", "completions", "models", "health", "tokenize", "version", "metrics")
StreamFault = Literal["invalid_json", "malformed_sse", "no_done", "stall"]
STREAM_FAULTS: tuple[StreamFault, ...] = ("invalid_json", "malformed_sse", "no_done", "stall")
STALL_SECONDS = 300.0  # a stalled stream goes quiet this long (a client or proxy timeout ends it sooner)
log = logging.getLogger("llmpod.mock_vllm")


class MockSettings(BaseModel):
    """How the mock behaves; every field can also be changed live through ``POST /mock/config``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("mock-model", min_length=1, description="the model path (`root` in /v1/models)")
    served_model_name: str | None = Field(None, min_length=1, description="the id clients use; default: model")
    max_model_len: int = Field(4096, ge=1, description="the context window, in tokens")
    api_key: SecretStr | None = Field(None, description="when set, /v1/* needs `Authorization: Bearer <key>`")
    first_token_delay: float = Field(0.0, ge=0, description="seconds before the first token")
    chunk_delay: float = Field(0.0, ge=0, description="seconds between tokens")
    chunk_count: int = Field(12, ge=1, description="content tokens per answer (fewer if max_tokens says so)")
    error_rate: float = Field(0.0, ge=0, le=1, description="fraction of generations answered 500")
    rate_limit_rate: float = Field(0.0, ge=0, le=1, description="fraction of generations answered 429")
    retry_after: float = Field(1.0, ge=0, description="Retry-After seconds on injected 429s")
    seed: int = Field(0, description="seeds the RNG that picks which requests get injected errors")
    die_after_chunks: int | None = Field(None, ge=0, description="cut each connection after N data events")
    stream_fault: StreamFault | None = Field(
        None, description="break streams after stream_fault_after data events: invalid_json (a truncated event), "
        "malformed_sse (an event runs into the next), no_done (ends without [DONE]), stall (goes quiet, "
        "connection open)")
    stream_fault_after: int = Field(3, ge=0, description="data events a broken stream sends before its fault")
    stream_fault_rate: float = Field(1.0, ge=0, le=1, description="fraction of streams stream_fault breaks")
    reasoning: bool = Field(False, description="chat answers think first (reasoning deltas)")
    dead: bool = Field(False, description="engine dead: /health 503, generations 500")
    wire_format: gen.WireFormat = Field("modern", description="modern (vLLM 0.33) or legacy (<= 0.10.0) shapes")
    enable_auto_tool_choice: bool = Field(False, description="as vLLM's flag: with tool_call_parser, answer tools")
    tool_call_parser: str | None = Field(None, min_length=1, description="as vLLM's flag (hermes, llama3_json, ...)")

    @model_validator(mode="after")
    def _parser_with_auto_choice(self) -> MockSettings:
        # vllm/entrypoints/common/cli_args.py (0.33.0) refuses to start with the switch and no parser
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("Error: --enable-auto-tool-choice requires --tool-call-parser")
        if self.enable_auto_tool_choice and self.tool_call_parser not in mock_tools.VLLM_TOOL_PARSERS:
            raise ValueError(f"invalid tool call parser: {self.tool_call_parser} "
                             f"(chose from {{ {','.join(mock_tools.VLLM_TOOL_PARSERS)} }})")
        return self

    @property
    def tool_parser(self) -> str | None:
        """The parser vLLM would use: it has one only with both flags (vllm/parser/parser_manager.py)."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model


class ConnectionCut(httpx.RemoteProtocolError):
    """Raised inside a response body to drop the connection, as a dying server does.

    Over a socket uvicorn closes the connection mid-body, so clients see an incomplete message. It derives
    from httpx's error so that an in-process client (``httpx.ASGITransport``) sees the same exception type.
    """


class _HideCuts(logging.Filter):
    """Keep uvicorn from printing a traceback for every cut we cause on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc: Any = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, ConnectionCut):
                return False
            inner = getattr(exc, "exceptions", None)  # an ExceptionGroup from a task group
            exc = inner[0] if inner and len(inner) == 1 else None
        return True


class _Metrics:
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        labels = ("model_name", "engine")
        self.running = Gauge("vllm:num_requests_running", "Requests in model execution batches.", labels,
                             registry=reg)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", labels, registry=reg)
        self.kv_cache = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", labels,
                              registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", labels,
                                         registry=reg)
        self.success = Counter("vllm:request_success", "Successfully processed requests.",
                               (*labels, "finished_reason"), registry=reg)


class _Mock:
    """One app's mutable state: settings, statistics, metrics and the fault-injection RNG."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.metrics = _Metrics()
        self.in_flight = 0
        self._kv_tokens = 0
        self.reset()

    def reset(self) -> None:
        self.rng.seed(self.settings.seed)
        self.requests = dict.fromkeys(_KINDS, 0)
        self.streams = 0
        self.injected = {"500": 0, "429": 0, "cut": 0, **dict.fromkeys(STREAM_FAULTS, 0)}
        self.errors: dict[str, int] = {}
        self.max_in_flight = self.in_flight
        self.last_request: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "streams": self.streams, "injected": self.injected,
                "errors": self.errors, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "last_request": self.last_request}

    def labels(self) -> dict[str, str]:
        return {"model_name": self.settings.served_name, "engine": "0"}

    def begin(self, tokens: int) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._kv_tokens += tokens
        self.update_gauges()

    def end(self, tokens: int) -> None:
        self.in_flight -= 1
        self._kv_tokens -= tokens
        self.update_gauges()

    def update_gauges(self) -> None:
        self.metrics.running.labels(**self.labels()).set(self.in_flight)
        self.metrics.waiting.labels(**self.labels()).set(0)
        capacity = _KV_CACHE_SEQUENCES * self.settings.max_model_len
        self.metrics.kv_cache.labels(**self.labels()).set(min(1.0, self._kv_tokens / capacity))

    def finished(self, req: gen.ParsedRequest, outputs: list[gen.Output]) -> None:
        m, labels = self.metrics, self.labels()
        m.prompt_tokens.labels(**labels).inc(sum(len(p.ids) for p in req.prompts))
        m.generation_tokens.labels(**labels).inc(sum(o.completion_tokens for o in outputs))
        for out in outputs:
            m.success.labels(**labels, finished_reason=out.finish_reason).inc()

    def error_response(self, err: gen.APIError, *, counted: bool = True) -> Response:
        if counted:
            self.errors[str(err.status)] = self.errors.get(str(err.status), 0) + 1
        body = gen.error_body(err, self.settings.wire_format)
        return _json(body, status=err.status, headers=err.headers)

    def check_model(self, requested: str | None) -> None:
        # A missing model means the served one (vLLM >= 0.8); the model path is not an alias for it.
        if requested is not None and requested != self.settings.served_name:
            message = f"The model `{requested}` does not exist."
            if self.settings.wire_format == "modern":  # vllm/entrypoints/serve/engine/serving.py (0.33.0)
                message += f" Valid aliases: {self.settings.served_name}."
            raise gen.APIError(404, "NotFoundError", message, "model")

    def inject_fault(self) -> None:
        s = self.settings
        if s.dead:
            raise gen.APIError(500, "InternalServerError", ENGINE_DEAD_MESSAGE)
        draw = self.rng.random()
        if draw < s.rate_limit_rate:
            self.injected["429"] += 1
            raise gen.APIError(429, "RateLimitError", "Mock vLLM: injected rate limit (rate_limit_rate).",
                               headers={"Retry-After": f"{s.retry_after:g}"})
        if draw < s.rate_limit_rate + s.error_rate:
            self.injected["500"] += 1
            raise gen.APIError(500, "InternalServerError", "Mock vLLM: injected failure (error_rate).")

    def pick_stream_fault(self, settings: MockSettings) -> StreamFault | None:
        if settings.stream_fault is None or self.rng.random() >= settings.stream_fault_rate:
            return None
        return settings.stream_fault


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    try:
        content = orjson.dumps(body)
    except TypeError:  # an integer beyond 64 bits, say in /mock/stats' last_request
        content = json.dumps(body).encode()
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


class _ApiKeyMiddleware:
    """vLLM's ``--api-key`` check: only paths under /v1, 401 ``{"error":"Unauthorized"}`` otherwise."""

    def __init__(self, app: ASGIApp, mock: _Mock) -> None:
        self.app = app
        self.mock = mock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.mock.settings.api_key
        if (scope["type"] == "http" and key is not None and scope["method"] != "OPTIONS"
                and scope["path"].startswith("/v1") and not _authorized(scope, key.get_secret_value())):
            await _json({"error": "Unauthorized"}, status=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _authorized(scope: Scope, key: str) -> bool:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    # Comparing digests keeps the time independent of where, and whether, the lengths differ.
    expected, given = hashlib.sha256(key.encode()).digest(), hashlib.sha256(token.strip().encode()).digest()
    return scheme.lower() == "bearer" and hmac.compare_digest(expected, given)


async def _read_json(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":  # vllm/entrypoints/serve/utils/api_utils.py:validate_json_request
        raise gen.request_validation_error(["Unsupported Media Type: Only 'application/json' is allowed"])
    raw = await request.body()
    try:
        # The standard parser, as in vLLM: orjson would turn integers beyond 64 bits into floats.
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise gen.json_decode_error(exc) from None
    except UnicodeDecodeError:
        raise gen.json_decode_error(json.JSONDecodeError("Invalid UTF-8", "", 0)) from None


def _install_log_filter() -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideCuts) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_HideCuts())


def create_app(settings: MockSettings) -> FastAPI:
    """A FastAPI app that behaves like vLLM's OpenAI-compatible server, with its own state and metrics."""
    _install_log_filter()
    mock = _Mock(settings)
    app = FastAPI(title="vLLM mock", version=VLLM_VERSION)
    app.add_middleware(_ApiKeyMiddleware, mock=mock)
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
            "id": f"modelperm-{secrets.token_hex(8)}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }
        card = {"id": s.served_name, "object": "model", "created": created, "owned_by": "vllm",
                "root": s.model, "parent": None, "max_model_len": s.max_model_len, "permission": [permission]}
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
                raise gen.bad_request("Input should be a valid dictionary or object to extract fields from")
            if "messages" in body:
                ids = gen.chat_prompt_ids(gen.validate_messages(body["messages"]))
            elif isinstance(body.get("prompt"), str):
                ids = gen.text_ids(body["prompt"])
            else:  # vLLM 0.33's TokenizeRequest is a union of the prompt and the messages form
                missing = {"type": "missing", "msg": "Field required", "input": body}
                raise gen.request_validation_error([{**missing, "loc": ("body", "prompt")},
                                                    {**missing, "loc": ("body", "messages")}])
            mock.check_model(body.get("model"))
        except gen.APIError as err:
            return mock.error_response(err)
        return _json({"count": len(ids), "max_model_len": mock.settings.max_model_len, "tokens": ids,
                      "token_strs": None})

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
                raise gen.bad_request("expected a JSON object of settings")
            if patch.get("api_key") == _MASK:  # our own answer posted back: keep the key
                del patch["api_key"]
            new = MockSettings.model_validate({**mock.settings.model_dump(), **patch})
        except gen.APIError as err:
            return mock.error_response(err, counted=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return mock.error_response(gen.bad_request(f"{where}: {first['msg']}", where), counted=False)
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


async def _generate(mock: _Mock, request: Request, kind: Literal["chat", "completion"]) -> Response:
    settings = mock.settings  # one request sees one configuration, even if /mock/config changes it
    mock.requests["chat.completions" if kind == "chat" else "completions"] += 1
    try:
        body = await _read_json(request)
        mock.last_request = {"path": request.url.path, "body": body, "headers": _safe_headers(request)}
        req = gen.parse_chat(body) if kind == "chat" else gen.parse_completion(body)
        mock.check_model(req.model)
        gen.check_render(req, max_model_len=settings.max_model_len, tool_parser=settings.tool_parser)
        mock.inject_fault()
    except gen.APIError as err:
        return mock.error_response(err)
    outputs = gen.generate(req, chunk_count=settings.chunk_count, reasoning=settings.reasoning,
                           max_model_len=settings.max_model_len, tool_parser=settings.tool_parser)
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    response_id = prefix + (request.headers.get("x-request-id") or secrets.token_hex(8))
    created = int(time.time())
    fingerprint = shapes.system_fingerprint(settings.model, settings.max_model_len)
    if req.stream:
        mock.streams += 1
        steps, tail = shapes.stream_chunks(req, outputs, response_id=response_id, created=created,
                                        model=settings.served_name, wire_format=settings.wire_format,
                                        fingerprint=fingerprint, parser=settings.tool_parser is not None)
        fault = mock.pick_stream_fault(settings)
        return EventStream(_stream(mock, settings, req, outputs, steps, tail, fault),
                           media_type="text/event-stream")
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
    payload = orjson.dumps(shapes.response_body(req, outputs, response_id=response_id, created=created,
                                             model=settings.served_name, wire_format=settings.wire_format,
                                             fingerprint=fingerprint))
    if settings.die_after_chunks is not None:
        mock.injected["cut"] += 1
        log.warning("mock vLLM: cutting a non-streaming response (die_after_chunks)")
        return StreamingResponse(_CutBody(), media_type="application/json",
                                 headers={"content-length": str(len(payload))})
    mock.finished(req, outputs)
    return Response(payload, media_type="application/json")


async def _stream(
    mock: _Mock, settings: MockSettings, req: gen.ParsedRequest, outputs: list[gen.Output],
    steps: list[list[dict[str, Any]]], tail: list[dict[str, Any]], fault: StreamFault | None = None,
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
                    event = event[:len(event) // 2] + b"\n\n" if fault == "invalid_json" else event[:-1]
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


class _CutBody:
    """A response body that fails before its first byte: the client gets headers, then a closed socket."""

    def __aiter__(self) -> _CutBody:
        return self

    async def __anext__(self) -> bytes:
        raise ConnectionCut("mock vLLM cut the connection (die_after_chunks)")


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
