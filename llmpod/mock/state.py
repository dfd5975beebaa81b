"""The mock vLLM server's settings and one app's mutable state: statistics, Prometheus metrics, fault injection."""

from __future__ import annotations

import json
import random
from typing import Any, Literal

import orjson
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from llmpod.mock import errors
from llmpod.mock import tools as mock_tools
from llmpod.mock.generation import Output
from llmpod.mock.requests import ParsedRequest

ENGINE_DEAD_MESSAGE = "The server had an error while processing your request."  # EngineDeadError.CLIENT_MESSAGE
_KV_CACHE_SEQUENCES = 16  # the mock's KV cache holds this many full-length sequences
KINDS = ("chat.completions", "completions", "models", "health", "tokenize", "version", "metrics")
StreamFault = Literal["invalid_json", "malformed_sse", "no_done", "stall"]
STREAM_FAULTS: tuple[StreamFault, ...] = ("invalid_json", "malformed_sse", "no_done", "stall")


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
        None,
        description="break streams after stream_fault_after data events: invalid_json (a truncated event), "
        "malformed_sse (an event runs into the next), no_done (ends without [DONE]), stall (goes quiet, "
        "connection open)",
    )
    stream_fault_after: int = Field(3, ge=0, description="data events a broken stream sends before its fault")
    stream_fault_rate: float = Field(1.0, ge=0, le=1, description="fraction of streams stream_fault breaks")
    reasoning: bool = Field(False, description="chat answers think first (reasoning deltas)")
    dead: bool = Field(False, description="engine dead: /health 503, generations 500")
    wire_format: errors.WireFormat = Field("modern", description="modern (vLLM 0.33) or legacy (<= 0.10.0) shapes")
    enable_auto_tool_choice: bool = Field(False, description="as vLLM's flag: with tool_call_parser, answer tools")
    tool_call_parser: str | None = Field(None, min_length=1, description="as vLLM's flag (hermes, llama3_json, ...)")
    mark_kind: bool = Field(
        True, description="every answer carries the header x-llmpod-kind: mock (false: no mark, as a real vLLM)"
    )

    @model_validator(mode="after")
    def _parser_with_auto_choice(self) -> MockSettings:
        # vllm/entrypoints/common/cli_args.py (0.33.0) refuses to start with the switch and no parser
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("Error: --enable-auto-tool-choice requires --tool-call-parser")
        if self.enable_auto_tool_choice and self.tool_call_parser not in mock_tools.VLLM_TOOL_PARSERS:
            raise ValueError(
                f"invalid tool call parser: {self.tool_call_parser} "
                f"(chose from {{ {','.join(mock_tools.VLLM_TOOL_PARSERS)} }})"
            )
        return self

    @property
    def tool_parser(self) -> str | None:
        """The parser vLLM would use: it has one only with both flags (vllm/parser/parser_manager.py)."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model


class Metrics:
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        labels = ("model_name", "engine")
        self.running = Gauge("vllm:num_requests_running", "Requests in model execution batches.", labels, registry=reg)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", labels, registry=reg)
        self.kv_cache = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", labels, registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", labels, registry=reg)
        self.success = Counter(
            "vllm:request_success", "Successfully processed requests.", (*labels, "finished_reason"), registry=reg
        )


class MockState:
    """One app's mutable state: settings, statistics, metrics and the fault-injection RNG."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.metrics = Metrics()
        self.in_flight = 0
        self._kv_tokens = 0
        self.reset()

    def reset(self) -> None:
        self.rng.seed(self.settings.seed)
        self.requests: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.streams = 0
        self.injected: dict[str, int] = {"500": 0, "429": 0, "cut": 0, **dict.fromkeys(STREAM_FAULTS, 0)}
        self.errors: dict[str, int] = {}
        self.max_in_flight = self.in_flight
        self.last_request: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "streams": self.streams,
            "injected": self.injected,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "last_request": self.last_request,
        }

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

    def finished(self, req: ParsedRequest, outputs: list[Output]) -> None:
        m, labels = self.metrics, self.labels()
        m.prompt_tokens.labels(**labels).inc(sum(len(p.ids) for p in req.prompts))
        m.generation_tokens.labels(**labels).inc(sum(o.completion_tokens for o in outputs))
        for out in outputs:
            m.success.labels(**labels, finished_reason=out.finish_reason).inc()

    def error_response(self, err: errors.APIError, *, counted: bool = True) -> Response:
        if counted:
            self.errors[str(err.status)] = self.errors.get(str(err.status), 0) + 1
        body = errors.error_body(err, self.settings.wire_format)
        return json_response(body, status=err.status, headers=err.headers)

    def check_model(self, requested: str | None) -> None:
        # A missing model means the served one (vLLM >= 0.8); the model path is not an alias for it.
        if requested is not None and requested != self.settings.served_name:
            message = f"The model `{requested}` does not exist."
            if self.settings.wire_format == "modern":  # vllm/entrypoints/serve/engine/serving.py (0.33.0)
                message += f" Valid aliases: {self.settings.served_name}."
            raise errors.APIError(404, "NotFoundError", message, "model")

    def inject_fault(self) -> None:
        s = self.settings
        if s.dead:
            raise errors.APIError(500, "InternalServerError", ENGINE_DEAD_MESSAGE)
        draw = self.rng.random()
        if draw < s.rate_limit_rate:
            self.injected["429"] += 1
            raise errors.APIError(
                429,
                "RateLimitError",
                "Mock vLLM: injected rate limit (rate_limit_rate).",
                headers={"Retry-After": f"{s.retry_after:g}"},
            )
        if draw < s.rate_limit_rate + s.error_rate:
            self.injected["500"] += 1
            raise errors.APIError(500, "InternalServerError", "Mock vLLM: injected failure (error_rate).")

    def pick_stream_fault(self, settings: MockSettings) -> StreamFault | None:
        if settings.stream_fault is None or self.rng.random() >= settings.stream_fault_rate:
            return None
        return settings.stream_fault


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    try:
        content = orjson.dumps(body)
    except TypeError:  # an integer beyond 64 bits, say in /mock/stats' last_request
        content = json.dumps(body).encode()
    return Response(content, status_code=status, headers=headers, media_type="application/json")
