"""A fake RunPod REST v2 API for tests, whose pods really serve the mock vLLM behind a RunPod-like HTTP proxy.

It follows the contract in /work/shared/reference/runpod.md (sections 1b, 3 and 8): problem+json errors,
``CreatePodRequest`` validation with ``unevaluatedProperties: false``, the ``Pod`` and ``GpuType`` shapes,
PROVISIONING -> STARTING -> RUNNING by the clock, SSE logs. Each pod runs ``llmpod.mock.server`` on 127.0.0.1
and a free port, configured from the pod's ``args`` and ``env["VLLM_API_KEY"]``; it listens only once the
pod is RUNNING plus ``vllm_load_seconds``, and until then the proxy answers 502, as RunPod's does. Arguments
vLLM refuses at start (``--enable-auto-tool-choice`` without a parser, or with one it does not know: the checks
``MockSettings`` makes) crash the container as soon as it runs: ERROR, "Container exited with status 1".

In-process::

    app = create_app(FakeRunPodSettings(api_key="k"))
    with LoopbackServer(app) as server:       # API base: server.url (routes under /v2)
        template = pod_url_template(server.url)  # RUNPOD_POD_URL_TEMPLATE
        fake: FakeRunPod = app.state.fake        # live state and switches

As a process: ``python3 -m tests.fakes.fake_runpod --port N --api-key KEY`` (or ``FAKE_RUNPOD_API_KEY``).

Routes. ``/v2/*`` needs ``Authorization: Bearer <api_key>``:

- ``POST /v2/pods``, ``GET /v2/pods``, ``GET|DELETE /v2/pods/{id}``, ``GET /v2/pods/{id}/logs?tail=&source=``
- ``GET /v2/catalog/gpus[?include=AVAILABILITY&product=POD&cloud=&count=]``, ``GET /v2/catalog/gpus/{id}``
- ``/proxy/{pod_id}-{port}/{path}``: the pod's HTTP proxy (``https://{pod_id}-{port}.proxy.runpod.net``)

Test-only, no auth: ``POST /fake/config`` (partial settings, applied live; answers the settings, key masked),
``GET /fake/state`` (settings, every pod ever created with its status history and mock port, call counts),
``POST /fake/reset`` (back to the start: settings, no pods, no calls),
``POST /fake/pods/{id}/die[?status=EXITED]`` (crash: ERROR, cost 0, mock stopped) and
``POST /fake/pods/{id}/vanish`` (RunPod reclaimed the pod: 404 from then on).

A pod's log stream stays open and sends new lines as they come, as RunPod's does (tests/fakes/fake_runpod_logs.py).
Every ``/v2`` request and answer is checked against the official spec (tests/fakes/runpod_spec_asgi.py); what breaks
it is kept in ``FakeRunPod.spec_violations`` (``specViolations`` in ``/fake/state``), for tests to fail on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, Literal

import httpx
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmpod.mock import MockSettings
from llmpod.mock import create_app as create_mock_app
from tests.fakes import fake_runpod_logs as fake_logs
from tests.fakes import fake_runpod_pods as fake_pods
from tests.fakes.fake_runpod_pods import FakePod, Problem
from tests.fakes.runpod_spec_asgi import SpecCheck
from tests.support.servers import LoopbackServer

log = logging.getLogger("tests.fakes.fake_runpod")
PROBLEM_JSON = "application/problem+json"
_MASK = "**********"  # how pydantic shows a SecretStr
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "server",
        "date",
    }
)
_BAD_GATEWAY = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
    "</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)


def pod_url_template(base_url: str) -> str:
    """``RUNPOD_POD_URL_TEMPLATE`` for pods of the fake served at ``base_url``."""
    return f"{base_url}/proxy/{{pod_id}}-{{port}}"


class FakeRunPodSettings(BaseModel):
    """The fake's behaviour. Every field can be changed live with ``POST /fake/config``; the phase lengths
    apply to pods created afterwards. The ``*_next`` counters count down as they fire."""

    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(SecretStr("fake-runpod-key"), description="the Bearer token /v2 routes accept")
    provisioning_seconds: float = Field(0.3, ge=0, description="a new pod is PROVISIONING this long")
    starting_seconds: float = Field(0.3, ge=0, description="then STARTING this long, then RUNNING")
    vllm_load_seconds: float = Field(0.3, ge=0, description="after RUNNING, vLLM listens after this long")
    no_capacity_gpu_ids: list[str] = Field([], description="creates with these GPU types fail on capacity (400)")
    forbidden_gpu_ids: list[str] = Field(
        [],
        description="creates with these GPU types answer 403: the account "
        "has no access to their pool (the spec's create table)",
    )
    rate_limit_next: int = Field(0, ge=0, description="the next N authenticated /v2 requests answer 429")
    retry_after: int = Field(1, ge=0, description="Retry-After seconds on those 429s")
    create_500_after_create: int = Field(0, ge=0, description="the next N creates make the pod, then answer 500")
    create_delay: float = Field(0.0, ge=0, description="seconds a create waits, after making the pod, to answer")
    delete_500_next: int = Field(0, ge=0, description="the next N DELETEs answer 500 and delete nothing")
    hold_creates: Literal["", "before_pod", "after_pod"] = Field(
        "", description='creates wait, before or after making the pod, until this is set back to "" (max 300 s)'
    )
    hold_deletes: bool = Field(False, description="DELETEs wait, before acting, until this is false (max 300 s)")
    hold_vllm: bool = Field(False, description="pods' vLLM does not listen (still loading) until this is false")
    balance_exhausted: bool = Field(False, description="creates answer 402")
    revoked: bool = Field(False, description="every /v2 request answers 401, as with a revoked key")
    proxy_timeout: float = Field(100.0, gt=0, description="seconds the proxy waits on a pod before a 524")
    mock_overrides: dict[str, Any] = Field({}, description="MockSettings fields for new pods' vLLM (chunk_delay…)")
    crash_loop: list[str] = Field(
        [],
        description="new pods' containers print these lines and die, again and again "
        "(RunPod restarts them): RUNNING and billed, never serving",
    )
    crash_after_seconds: float = Field(2.0, gt=0, description="how long each of those containers lives")
    host_cuda: str = Field(
        "",
        pattern=r"^(\d+\.\d+)?$",
        description="new pods land on a host whose driver runs this CUDA (e.g. '12.4'), whatever "
        "gpu.minCudaVersion asks: a host that misreports its driver, or a floor "
        "llmpod got wrong; an image that needs more crash-loops there",
    )
    capacity_wording: Literal["live", "spec"] = Field(
        "live", description="the no-capacity 400's detail: RunPod's live message, or the spec's description"
    )
    log_stream_seconds: float = Field(
        300.0, ge=0, description="a log stream ends after this long at the latest (0: the backlog, then the end)"
    )

    @field_validator("mock_overrides")
    @classmethod
    def _known_mock_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        MockSettings(**value)  # a ValidationError is a ValueError: reported against this field
        return value


class FakeRunPod:
    """The fake's state: pods (deleted ones included), their mock vLLM servers, call counts, settings."""

    def __init__(self, settings: FakeRunPodSettings) -> None:
        self.settings, self.initial = settings, settings.model_copy()
        self.pods: dict[str, FakePod] = {}
        self.calls: Counter[str] = Counter()
        self.servers: dict[str, LoopbackServer] = {}  # pod id -> its mock vLLM, until the pod ends
        self.listening: set[str] = set()  # pods whose mock vLLM accepts connections
        self.http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self.held = 0  # requests waiting in hold()
        self.stopping = threading.Event()  # set as the server stops: open log streams end, or they would hold it
        self.spec_violations: list[str] = []  # what broke the official spec (tests/fakes/runpod_spec_asgi.py)

    def take_violations(self) -> list[str]:
        taken, self.spec_violations[:] = list(self.spec_violations), []
        return taken

    def configure(self, patch: dict[str, Any]) -> FakeRunPodSettings:
        if patch.get("api_key") == _MASK:  # our own answer posted back: keep the key
            patch = {k: v for k, v in patch.items() if k != "api_key"}
        self.settings = FakeRunPodSettings.model_validate({**dict(self.settings), **patch})
        log.info("fake RunPod settings changed: %s", sorted(patch))
        return self.settings

    def pod(self, pod_id: str) -> FakePod:
        pod = self.pods.get(pod_id)
        if pod is None or pod.gone:
            raise Problem(404, "pod not found")
        return pod

    async def create(self, body: Any) -> FakePod:
        settings, req = self.settings, fake_pods.parse_create(body)
        assert req.gpu is not None
        gpu = fake_pods.GPUS.get(req.gpu.id)
        if gpu is None:
            raise Problem(404, "gpu type not found")
        if gpu.id in settings.forbidden_gpu_ids:  # the spec's ForbiddenError example body
            raise Problem(403, fake_pods.POOL_FORBIDDEN)
        if settings.balance_exhausted:
            raise Problem(402, "insufficient balance: add funds to deploy this pod")
        if gpu.id in settings.no_capacity_gpu_ids:
            raise Problem(400, fake_pods.NO_CAPACITY)
        data_center, cuda = fake_pods.place(req, gpu)
        cuda = settings.host_cuda or cuda
        pod = FakePod(
            req,
            gpu,
            data_center,
            cuda,
            settings.provisioning_seconds,
            settings.starting_seconds,
            settings.vllm_load_seconds,
        )
        launch = pod.launch
        try:  # vLLM's own checks of its tool flags (MockSettings makes them), before it loads anything
            mock = MockSettings(
                **{
                    "mark_kind": False,  # a pod runs a real vLLM, which does not mark itself as the mock does
                    **settings.mock_overrides,
                    "model": launch.model,
                    "api_key": launch.api_key,
                    "served_model_name": launch.served_model_name,
                    **({"max_model_len": launch.max_model_len} if launch.max_model_len else {}),
                    "enable_auto_tool_choice": launch.enable_auto_tool_choice,
                    **({"tool_call_parser": launch.tool_call_parser} if launch.tool_call_parser else {}),
                }
            )
        except ValidationError as exc:
            pod.exit_line = "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in exc.errors())
            self.pods[pod.id] = pod
            self._spawn(self._exit_at_start(pod))
            log.info("created pod %s, whose vLLM will refuse its arguments: %s", pod.id, pod.exit_line)
            return pod
        need = fake_pods.image_cuda_need(req.image)
        if need is not None and fake_pods.version(need) > fake_pods.version(cuda):
            pod.crash = fake_pods.driver_too_old(cuda, req.image, req.env)
        elif settings.crash_loop:
            pod.crash = fake_pods.CrashLoop(tuple(settings.crash_loop), settings.crash_after_seconds)
        if pod.crash is not None:  # its vLLM never listens: the proxy answers 502 for as long as it lives
            self.pods[pod.id] = pod
            log.info("created pod %s, whose container crash-loops on a CUDA %s host", pod.id, cuda)
            return pod
        server = LoopbackServer(create_mock_app(mock))  # its port is bound now; nothing listens until start()
        self.pods[pod.id], self.servers[pod.id], pod.mock_port = pod, server, server.port
        self._spawn(self._serve_when_ready(pod, server))
        log.info("created pod %s (%s x%d in %s)", pod.id, gpu.id, req.gpu.count, data_center)
        return pod

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exit_at_start(self, pod: FakePod) -> None:
        """vLLM refuses its arguments first thing (vLLM 0.33: vllm/entrypoints/common/cli_args.py:554 and :620,
        exit status 1): the container crashes as soon as it runs, as ``POST /fake/pods/{id}/die`` makes it."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), max(0.0, pod.running_at - time.monotonic()))
        if not self._closing.is_set() and not pod.events:
            await self.end(pod, "ERROR")

    async def _serve_when_ready(self, pod: FakePod, server: LoopbackServer) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), max(0.0, pod.ready_at - time.monotonic()))
        await self.hold(lambda: self.settings.hold_vllm, limit=600.0)
        async with pod.lock:
            if not self._closing.is_set() and self.servers.get(pod.id) is server:
                try:
                    await asyncio.to_thread(server.start)
                except RuntimeError:  # LoopbackServer gave up; the pod stays unreachable (502), like a dead vLLM
                    log.exception("pod %s: its mock vLLM did not start", pod.id)
                else:
                    self.listening.add(pod.id)

    async def hold(self, holding: Callable[[], bool], limit: float = 300.0) -> None:
        """Wait while ``holding()`` (a switch a test turns off to let the request go on), or the fake closes.
        The request goes on even if its client has gone, as RunPod's would."""
        deadline = time.monotonic() + limit
        self.held += 1
        try:
            while holding() and not self._closing.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            self.held -= 1

    async def reset(self) -> None:
        """Back to how it started, for the next test: settings, no pods (every mock vLLM stopped), no calls.
        Held requests are let go first and finish before the pods are ended."""
        self.settings = self.initial.model_copy()
        deadline = time.monotonic() + 10
        while self.held and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for pod in list(self.pods.values()):
            if not pod.gone:
                await self.end(pod, "TERMINATED")
        self.pods.clear()
        self.calls.clear()
        self.spec_violations.clear()

    async def end(self, pod: FakePod, status: str, *, vanish: bool = False) -> None:
        """The pod becomes ``status`` (ERROR, EXITED or TERMINATED) now, and its mock vLLM stops."""
        pod.events.append((status, time.monotonic()))
        pod.vanished = vanish
        async with pod.lock:
            server = self.servers.pop(pod.id, None)
            self.listening.discard(pod.id)
            if server is not None:
                await asyncio.to_thread(_kill, server)
        log.info("pod %s is now %s%s", pod.id, status, " (vanished)" if vanish else "")

    async def open(self) -> None:
        self._closing = asyncio.Event()
        self.http = httpx.AsyncClient(trust_env=False, follow_redirects=False)

    async def close(self) -> None:
        self._closing.set()
        self.stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        servers, self.servers = list(self.servers.values()), {}
        self.listening.clear()
        await asyncio.gather(*(asyncio.to_thread(_kill, server) for server in servers))
        if self.http is not None:
            await self.http.aclose()
        log.info("fake RunPod stopped (%d mock vLLM servers)", len(servers))

    def state(self) -> dict[str, Any]:
        now, listed = time.monotonic(), []
        for pod in list(self.pods.values()):  # may be called from a test's thread
            history = [{"status": status, "at": pod.wall(at).isoformat()} for status, at in pod.history(now)]
            listed.append(
                {
                    **pod.view(now),
                    "deleted": pod.gone,
                    "vanished": pod.vanished,
                    "mockPort": pod.mock_port,
                    "mockListening": pod.id in self.listening,
                    "history": history,
                }
            )
        return {
            "settings": self.settings.model_dump(mode="json"),
            "pods": listed,
            "calls": dict(self.calls),
            "specViolations": list(self.spec_violations),
        }


_DYING: set[str] = set()  # threads of pods' mock vLLM servers being killed: their dying noise is expected


def _kill(server: LoopbackServer) -> None:
    """Stop a pod's vLLM as a killed container stops: answers in flight are cut, not finished."""
    name = server.thread_name
    _DYING.add(name)
    try:
        server.stop(grace=0.1)  # then uvicorn cancels what still runs
    finally:
        _DYING.discard(name)


class _UpstreamCut(Exception):
    """The pod dropped the connection mid-answer, so the proxy drops the client's too."""


class _HideExpected(logging.Filter):
    """No tracebacks for cuts we relay on purpose, nor for the mock servers we kill."""

    def filter(self, record: logging.LogRecord) -> bool:
        cut = record.exc_info is not None and isinstance(record.exc_info[1], _UpstreamCut)
        return not (cut or record.threadName in _DYING)


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(problem.body(), status_code=problem.status, headers=problem.headers, media_type=PROBLEM_JSON)


def create_app(settings: FakeRunPodSettings | None = None) -> FastAPI:
    """The fake RunPod API; its state is ``app.state.fake``. The lifespan stops every pod's mock vLLM."""
    fake = FakeRunPod(settings or FakeRunPodSettings())
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideExpected) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_HideExpected())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await fake.open()
        try:
            yield
        finally:
            await fake.close()

    app = FastAPI(title="fake RunPod REST v2", lifespan=lifespan, openapi_url=None)
    app.state.fake = fake

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> Response:
        if exc.detail == fake_pods.NO_CAPACITY and fake.settings.capacity_wording == "live":
            exc = Problem(400, fake_pods.NO_CAPACITY_LIVE, headers=exc.headers)
        return problem_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return problem_response(Problem(exc.status_code, str(exc.detail).lower()))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return problem_response(Problem(422, "Request validation failed.", errors=errors))

    app.include_router(_v2_routes(fake))
    app.include_router(_fake_routes(fake))
    _add_proxy(app, fake)
    app.add_middleware(SpecCheck, record=fake.spec_violations.append)
    return app


def _v2_routes(fake: FakeRunPod) -> APIRouter:
    async def guard(request: Request) -> None:
        route = request.scope.get("route")
        fake.calls[f"{request.method} {getattr(route, 'path', request.url.path)}"] += 1
        settings = fake.settings
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        expected = settings.api_key.get_secret_value().encode()
        if settings.revoked or not hmac.compare_digest(token.strip().encode(), expected):
            raise Problem(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        if settings.rate_limit_next > 0:
            settings.rate_limit_next -= 1
            wait = str(settings.retry_after)
            raise Problem(
                429,
                "rate limit exceeded for the minute window",
                headers={"Retry-After": wait, "RateLimit": f'"minute";r=0;t={wait}'},
            )

    v2 = APIRouter(prefix="/v2", dependencies=[Depends(guard)])

    @v2.post("/pods")
    async def create_pod(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise Problem(400, "request body is not valid JSON") from None
        await fake.hold(lambda: fake.settings.hold_creates == "before_pod")
        pod = await fake.create(body)
        await fake.hold(lambda: fake.settings.hold_creates == "after_pod")
        settings = fake.settings
        fail = settings.create_500_after_create > 0
        if fail:
            settings.create_500_after_create -= 1
        if settings.create_delay:
            await asyncio.sleep(settings.create_delay)
        if fail:
            raise Problem(500, "internal server error")
        return JSONResponse(pod.view(), status_code=201)

    @v2.get("/pods")
    async def list_pods() -> dict[str, Any]:
        now = time.monotonic()
        return {"pods": [pod.view(now) for pod in fake.pods.values() if not pod.gone]}

    @v2.get("/pods/{pod_id}")
    async def get_pod(pod_id: str) -> dict[str, Any]:
        return fake.pod(pod_id).view()

    @v2.delete("/pods/{pod_id}")
    async def delete_pod(pod_id: str) -> Response:
        await fake.hold(lambda: fake.settings.hold_deletes)
        pod, settings = fake.pod(pod_id), fake.settings
        if settings.delete_500_next > 0:
            settings.delete_500_next -= 1
            raise Problem(500, "internal server error")
        await fake.end(pod, "TERMINATED")
        return Response(status_code=204)

    @v2.get("/pods/{pod_id}/logs")
    async def pod_logs(pod_id: str, request: Request) -> Response:
        return fake_logs.logs_response(fake, fake.pod(pod_id), request.query_params, request.headers)

    @v2.get("/catalog/gpus")
    async def list_gpus(request: Request) -> dict[str, Any]:
        availability = fake_pods.availability_query(request.query_params)
        no_capacity, floor = fake.settings.no_capacity_gpu_ids, fake_pods.min_cuda_query(request.query_params)
        return {"gpus": [gpu.to_json(availability, gpu.id in no_capacity, floor) for gpu in fake_pods.GPU_TYPES]}

    @v2.get("/catalog/gpus/{gpu_id}")
    async def get_gpu(gpu_id: str, request: Request) -> dict[str, Any]:
        availability = fake_pods.availability_query(request.query_params)
        gpu = fake_pods.GPUS.get(gpu_id)
        if gpu is None:
            raise Problem(404, "gpu type not found")
        floor = fake_pods.min_cuda_query(request.query_params)
        return gpu.to_json(availability, gpu.id in fake.settings.no_capacity_gpu_ids, floor)

    return v2


def _fake_routes(fake: FakeRunPod) -> APIRouter:
    routes = APIRouter(prefix="/fake", include_in_schema=False)

    @routes.post("/config")
    async def config(request: Request) -> dict[str, Any]:
        try:
            patch = json.loads(await request.body())
            if not isinstance(patch, dict):
                raise Problem(422, "Request validation failed.", errors=["$: want an object of settings"])
            return fake.configure(patch).model_dump(mode="json")
        except ValueError as exc:  # bad JSON, or a pydantic ValidationError
            errors = fake_pods.validation_errors(exc) if isinstance(exc, ValidationError) else [str(exc)]
            raise Problem(422, "Request validation failed.", errors=errors) from None

    @routes.post("/reset")
    async def reset() -> Response:
        await fake.reset()
        return Response(status_code=204)

    @routes.get("/state")
    async def state() -> dict[str, Any]:
        return fake.state()

    @routes.post("/pods/{pod_id}/die")
    async def die(pod_id: str, status: str = "ERROR") -> dict[str, Any]:
        pod = fake.pod(pod_id)
        if status not in ("ERROR", "EXITED"):
            raise Problem(422, "Request validation failed.", errors=["status: value must be one of ERROR, EXITED"])
        if pod.events:
            raise Problem(409, f"pod is already {pod.status()}")
        await fake.end(pod, status)
        return pod.view()

    @routes.post("/pods/{pod_id}/vanish")
    async def vanish(pod_id: str) -> Response:
        await fake.end(fake.pod(pod_id), "TERMINATED", vanish=True)
        return Response(status_code=204)

    return routes


def _add_proxy(app: FastAPI, fake: FakeRunPod) -> None:
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

    @app.api_route("/proxy/{pod_id}-{port}/{path:path}", methods=methods, include_in_schema=False)
    async def proxy(request: Request, pod_id: str, port: str, path: str) -> Response:
        """RunPod's HTTP proxy: 404 for unknown pods and ports not exposed as http, 502 until vLLM listens."""
        fake.calls[f"PROXY {request.method} /{path}"] += 1
        pod = fake.pods.get(pod_id)
        if pod is None or pod.vanished or not port.isdigit() or int(port) not in pod.exposed("http"):
            return Response("404 page not found\n", status_code=404, media_type="text/plain")
        server = fake.servers.get(pod_id)
        if server is None or pod.status() != "RUNNING" or not pod.serves_http(int(port)):
            return Response(_BAD_GATEWAY, status_code=502, media_type="text/html")
        prefix = f"/proxy/{pod_id}-{port}".encode()
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        target = raw_path[len(prefix) :] if raw_path.startswith(prefix) else b"/" + path.encode()
        query = request.scope.get("query_string", b"")
        url = httpx.URL(
            scheme="http", host="127.0.0.1", port=server.port, raw_path=target + (b"?" + query if query else b"")
        )
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        assert fake.http is not None
        outgoing = fake.http.build_request(
            request.method,
            url,
            headers=headers,
            content=await request.body(),
            timeout=httpx.Timeout(fake.settings.proxy_timeout, connect=5.0),
        )
        try:
            upstream = await fake.http.send(outgoing, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):  # not listening (yet, or any more)
            return Response(_BAD_GATEWAY, status_code=502, media_type="text/html")
        except httpx.TimeoutException:  # Cloudflare gives up after 100 s
            return Response("error code: 524", status_code=524, media_type="text/plain")
        except httpx.TransportError:
            return Response(_BAD_GATEWAY, status_code=502, media_type="text/html")
        forwarded = {k: v for k, v in upstream.headers.multi_items() if k.lower() not in _HOP_BY_HOP}
        return StreamingResponse(_relay(upstream), status_code=upstream.status_code, headers=forwarded)


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The pod's answer, chunk by chunk as it arrives (SSE must not be buffered)."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.TransportError as exc:
        raise _UpstreamCut(str(exc)) from exc
    finally:
        await upstream.aclose()


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"fake RunPod listening on http://127.0.0.1:{self.config.port}", file=sys.stderr, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.config.app.state.fake.stopping.set()  # open log streams end now, not after the graceful timeout
        await super().shutdown(sockets=sockets)


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    # uvicorn handles SIGTERM/SIGINT while it serves, shuts down (the lifespan stops every mock), then re-raises
    # the signal: this handler turns that into a clean exit 0. Before uvicorn serves, it simply exits.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.fakes.fake_runpod",
        description="A fake RunPod REST v2 API with mock vLLM pods, on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1 only)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FAKE_RUNPOD_API_KEY"),
        help="the Bearer token to accept (default: $FAKE_RUNPOD_API_KEY, else fake-runpod-key)",
    )
    parser.add_argument("--provisioning-seconds", type=float)
    parser.add_argument("--starting-seconds", type=float)
    parser.add_argument("--vllm-load-seconds", type=float)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("provisioning_seconds", "starting_seconds", "vllm_load_seconds", "api_key")
        if getattr(args, name) is not None
    }
    try:
        settings = FakeRunPodSettings(**values)
    except ValidationError as exc:
        parser.error("; ".join(fake_pods.validation_errors(exc)))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_quietly)
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    _Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
