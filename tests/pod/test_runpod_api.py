"""The RunPod REST v2 client against respx fakes of the v2 routes (contract: runpod.md sections 1b and 8)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import httpx
import pydantic
import pytest
import respx

from llmpod.errors import (
    NoCapacityError,
    PoolForbiddenError,
    RunPodAuthError,
    RunPodBalanceError,
    RunPodError,
    RunPodNotFound,
    RunPodRateLimited,
    RunPodRequestError,
    RunPodUnavailable,
)
from llmpod.pod.providers import (
    DEFAULT_API_BASE,
    POD_URL_TEMPLATE,
    CreatePodRequest,
    GpuRequest,
    GpuType,
    Pod,
    RunPodClient,
)
from tests.fakes.runpod_spec_asgi import shared_spec

BASE = "https://api.runpod.test"
KEY = "rpa_FAKE-test-key-0123456789-never-shown"  # obviously fake
VLLM_KEY = "sk-vllm-secret-in-env"
SPEC = shared_spec()

# The spec's POST /v2/pods 201 example (runpod.md 8.2): PROVISIONING with "runtime": {}
PROVISIONING_POD: dict[str, Any] = {
    "id": "7h9k2m4n6p",
    "name": "pytorch-training",
    "image": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
    "args": "",
    "disk": 50,
    "ports": ["8888/http", "22/tcp"],
    "env": {"MODEL_NAME": "llama-3"},
    "registry": None,
    "status": "PROVISIONING",
    "actions": ["start", "terminate"],
    "mounts": {"persistent": {"size": 20, "path": "/workspace"}},
    "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1},
    "cloud": "SECURE",
    "dataCenterId": "US-KS-2",
    "cudaVersion": "12.8",
    "ssh": {
        "proxy": {
            "host": "ssh.runpod.io",
            "port": 22,
            "username": "7h9k2m4n6p-64411eb2",
            "command": "ssh 7h9k2m4n6p-64411eb2@ssh.runpod.io",
        },
        "direct": None,
    },
    "template": "9x4m2p7v",
    "cost": 0.44,
    "locked": False,
    "globalNetworking": {"enabled": False},
    "runtime": {},
    "createdAt": "2026-06-01T12:00:00Z",
    "startedAt": None,
}

# The spec's GET /v2/pods/{id} example (runpod.md 1b): RUNNING with runtime.uptime
RUNNING_POD: dict[str, Any] = {
    **PROVISIONING_POD,
    "status": "RUNNING",
    "actions": ["stop", "restart", "terminate"],
    "ssh": {
        "proxy": {
            "host": "ssh.runpod.io",
            "port": 22,
            "username": "7h9k2m4n6p-64411eb2",
            "command": "ssh 7h9k2m4n6p-64411eb2@ssh.runpod.io",
        },
        "direct": {
            "host": "195.26.233.3",
            "port": 34446,
            "username": "root",
            "command": "ssh root@195.26.233.3 -p 34446",
        },
    },
    "runtime": {"uptime": 3600, "ports": [{"private": 22, "public": 34446, "type": "tcp", "ip": "195.26.233.3"}]},
    "startedAt": "2026-06-01T12:02:00Z",
}

# runpod.md 8.1
GPU_CATALOG: dict[str, Any] = {
    "gpus": [
        {
            "id": "NVIDIA GeForce RTX 4090",
            "name": "RTX 4090",
            "pool": "ADA_24",
            "manufacturer": "NVIDIA",
            "memory": 24,
            "secure": True,
            "community": True,
            "price": {"secure": 0.44, "community": 0.31, "serverless": 1.1},
            "maxCount": {"secure": 8, "community": 4},
            "availability": "HIGH",
            "dataCenters": [{"id": "US-KS-2", "name": "US Kansas 2", "availability": "HIGH"}],
        }
    ]
}

# runpod.md 8.5, plus a second event to check ordering, tail and resumption
LOG_EVENTS = [
    ("2026-06-01T12:02:03Z/000000000001", "Model loaded."),
    ("2026-06-01T12:02:04Z/000000000002", "Starting vLLM API server on http://0.0.0.0:8000"),
    ("2026-06-01T12:02:05Z/000000000003", "Application startup complete."),
]


def sse(events: list[tuple[str, str]]) -> bytes:
    return b"".join(
        f"id: {event_id}\ndata: {json.dumps({'ts': event_id[:20], 'source': 'container', 'line': line})}\n\n".encode()
        for event_id, line in events
    )


def problem(status: int, title: str, detail: str, **extra: Any) -> httpx.Response:
    return httpx.Response(
        status,
        json={"title": title, "status": status, "detail": detail, **extra},
        headers={"Content-Type": "application/problem+json"},
    )


def vllm_request() -> CreatePodRequest:
    return CreatePodRequest(
        name="llmpod-ab12cd34",
        image="vllm/vllm-openai:v0.33.0",
        gpu=GpuRequest(id="NVIDIA L40S"),
        disk=60,
        ports=["8000/http"],
        env={"VLLM_API_KEY": VLLM_KEY},
        args="--model Qwen/Qwen2.5-7B-Instruct --host 0.0.0.0 --port 8000",
    )


@pytest.fixture
def mocked_runpod() -> Iterator[respx.MockRouter]:
    """A fake RunPod v2 API; a request to a route no test declared fails the test, and so does any request the
    client sent that breaks the official spec (tests/fakes/runpod_spec.py)."""
    router = respx.MockRouter(base_url=BASE, assert_all_mocked=True, assert_all_called=False)
    yield router
    router.assert_all_called()
    sent = [call.request for call in router.calls]
    assert [
        error
        for r in sent
        for error in SPEC.request_errors(
            r.method, r.url.raw_path.split(b"?")[0].decode(), r.url.query, r.content, r.headers.get("content-type")
        )
    ] == []


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(mocked_runpod: respx.MockRouter, sleeps: list[float]) -> Iterator[RunPodClient]:
    with RunPodClient(
        KEY, BASE + "/", transport=httpx.MockTransport(mocked_runpod.handler), sleep=sleeps.append
    ) as runpod:
        yield runpod


def assert_no_key(exc: BaseException) -> None:
    assert KEY not in str(exc) and KEY not in repr(exc)
    assert "\n" not in str(exc)


# --- request shapes and parsing ------------------------------------------------------------------------------


def test_list_pods_sends_auth_headers_and_parses_the_spec_examples(
    client: RunPodClient, mocked_runpod: respx.MockRouter
) -> None:
    route = mocked_runpod.get("/v2/pods").respond(200, json={"pods": [PROVISIONING_POD, RUNNING_POD]})
    provisioning, running = client.list_pods()

    request = route.calls.last.request
    assert request.url == f"{BASE}/v2/pods"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Accept"] == "application/json"
    assert provisioning == Pod(
        id="7h9k2m4n6p",
        name="pytorch-training",
        status="PROVISIONING",
        cost_per_hour=0.44,
        gpu_id="NVIDIA GeForce RTX 4090",
        created_at="2026-06-01T12:00:00Z",
        started_at=None,
        uptime_seconds=None,
        raw=PROVISIONING_POD,
    )
    assert not provisioning.running and not provisioning.gone
    assert running.running and running.uptime_seconds == 3600 and running.started_at == "2026-06-01T12:02:00Z"
    assert running.raw == RUNNING_POD


def test_pod_tolerates_missing_optional_and_unknown_fields() -> None:
    pod = Pod.from_json({"id": "p1", "name": "n", "status": "TERMINATED", "runtime": None, "newField": [1]})
    assert pod.gone and not pod.running
    assert (pod.cost_per_hour, pod.gpu_id, pod.created_at, pod.started_at, pod.uptime_seconds) == (
        0.0,
        None,
        None,
        None,
        None,
    )
    assert Pod.from_json({"id": "p2", "cost": "0.5", "runtime": {"uptime": 12}}).cost_per_hour == 0.5
    assert Pod.from_json({"id": "p2", "runtime": {"uptime": 12}}).uptime_seconds == 12
    with pytest.raises(RunPodError, match="without an id") as caught:
        Pod.from_json({"name": "n", "env": {"VLLM_API_KEY": VLLM_KEY}})
    assert VLLM_KEY not in str(caught.value)


def test_pod_repr_keeps_the_env_secrets_out() -> None:
    pod = Pod.from_json({**RUNNING_POD, "env": {"VLLM_API_KEY": VLLM_KEY}})
    assert VLLM_KEY not in repr(pod) and "7h9k2m4n6p" in repr(pod)
    assert VLLM_KEY not in repr(vllm_request())


def test_get_pod_percent_encodes_the_id(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    route = mocked_runpod.get("/v2/pods/pod%20abc%2F1").respond(200, json=RUNNING_POD)
    assert client.get_pod("pod abc/1") == Pod.from_json(RUNNING_POD)
    assert route.calls.last.request.url.raw_path == b"/v2/pods/pod%20abc%2F1"


def test_get_pod_404_is_none(client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]) -> None:
    mocked_runpod.get("/v2/pods/gone1").mock(return_value=problem(404, "Not Found", "pod not found"))
    assert client.get_pod("gone1") is None
    assert sleeps == []


def test_create_pod_sends_exactly_the_vllm_body(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    route = mocked_runpod.post("/v2/pods").respond(201, json=PROVISIONING_POD)
    pod = client.create_pod(vllm_request())

    request = route.calls.last.request
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == {
        "name": "llmpod-ab12cd34",
        "image": "vllm/vllm-openai:v0.33.0",
        "gpu": {"id": "NVIDIA L40S", "count": 1},
        "cloud": "SECURE",
        "disk": 60,
        "ports": ["8000/http"],
        "env": {"VLLM_API_KEY": VLLM_KEY},
        "args": "--model Qwen/Qwen2.5-7B-Instruct --host 0.0.0.0 --port 8000",
    }
    assert pod.id == "7h9k2m4n6p" and pod.status == "PROVISIONING"


def test_create_pod_body_has_no_null_fields(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    route = mocked_runpod.post("/v2/pods").respond(201, json=PROVISIONING_POD)
    client.create_pod(
        CreatePodRequest(
            name="a",
            templateId="tpl1",
            cloud="COMMUNITY",
            dataCenterIds=["US-KS-2"],
            gpu=GpuRequest(id="NVIDIA L40S", count=2, minCudaVersion="12.8"),
        )
    )
    assert json.loads(route.calls.last.request.content) == {
        "name": "a",
        "templateId": "tpl1",
        "cloud": "COMMUNITY",
        "dataCenterIds": ["US-KS-2"],
        "env": {},
        "ports": [],
        "gpu": {"id": "NVIDIA L40S", "count": 2, "minCudaVersion": "12.8"},
    }


@pytest.mark.parametrize(
    "build",
    [
        lambda: CreatePodRequest(name="a", image="i", gpu=GpuRequest(id="g"), bogus=1),  # type: ignore[call-arg]
        lambda: CreatePodRequest(name="a", image="i", gpu={"id": "g", "minVcpuCountPerGpu": 2}),  # type: ignore[arg-type]
        lambda: CreatePodRequest(name="a", gpu=GpuRequest(id="g")),  # neither image nor templateId
        lambda: CreatePodRequest(name="", image="i", gpu=GpuRequest(id="g")),
        lambda: CreatePodRequest(name="a", image="i", cloud="secure", gpu=GpuRequest(id="g")),  # type: ignore[arg-type]
        lambda: GpuRequest(id="g", count=0),
    ],
    ids=["unknown-field", "unknown-gpu-field", "no-image", "empty-name", "lowercase-cloud", "zero-gpus"],
)
def test_create_request_is_refused_locally(build: Any) -> None:
    with pytest.raises(pydantic.ValidationError):
        build()


def test_delete_pod(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    route = mocked_runpod.delete("/v2/pods/p1").respond(204)
    mocked_runpod.delete("/v2/pods/p2").mock(return_value=problem(404, "Not Found", "pod not found"))
    assert client.delete_pod("p1") is True
    assert client.delete_pod("p2") is False
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {KEY}"


def test_gpu_types_asks_for_pod_availability(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    route = mocked_runpod.get("/v2/catalog/gpus").respond(200, json=GPU_CATALOG)
    (gpu,) = client.gpu_types("COMMUNITY")
    assert route.calls.last.request.url.query == b"include=AVAILABILITY&product=POD&cloud=COMMUNITY"
    assert gpu == GpuType(
        id="NVIDIA GeForce RTX 4090",
        name="RTX 4090",
        memory_gb=24,
        price_secure=0.44,
        price_community=0.31,
        secure=True,
        community=True,
        availability="HIGH",
    )
    assert (gpu.price("SECURE"), gpu.price("community")) == (0.44, 0.31)
    with pytest.raises(ValueError, match="unknown cloud"):
        gpu.price("SPOT")


def test_gpu_types_without_availability_sends_no_query(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    catalog = {"gpus": [{k: v for k, v in GPU_CATALOG["gpus"][0].items() if k not in ("availability", "dataCenters")}]}
    route = mocked_runpod.get("/v2/catalog/gpus").respond(200, json=catalog)
    (gpu,) = client.gpu_types(availability=False)
    assert route.calls.last.request.url.query == b""
    assert gpu.availability is None


def test_check_key(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    mocked_runpod.get("/v2/pods").mock(
        side_effect=[httpx.Response(200, json={"pods": []}), problem(401, "Unauthorized", "missing bearer token")]
    )
    client.check_key()
    with pytest.raises(RunPodAuthError, match="401 Unauthorized: missing bearer token") as caught:
        client.check_key()
    assert caught.value.status == 401


def test_constants_and_repr() -> None:
    assert DEFAULT_API_BASE == "https://api.runpod.io"
    assert POD_URL_TEMPLATE.format(pod_id="abc", port=8000) == "https://abc-8000.proxy.runpod.net"
    runpod = RunPodClient(KEY, transport=httpx.MockTransport(lambda request: httpx.Response(500)))
    assert KEY not in repr(runpod) and "api.runpod.io" in repr(runpod)
    runpod.close()


# --- errors that are never retried ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "error", "words"),
    [
        (
            problem(401, "Unauthorized", "missing bearer token"),
            RunPodAuthError,
            "401 Unauthorized: missing bearer token",
        ),
        (
            problem(403, "Forbidden", "access denied"),
            PoolForbiddenError,
            "403 Forbidden: access denied (this account has no access to the NVIDIA L40S pool)",
        ),
        (problem(402, "Payment Required", "insufficient balance"), RunPodBalanceError, "insufficient balance"),
        (problem(404, "Not Found", "template not found"), RunPodNotFound, "404 Not Found: template not found"),
        (problem(409, "Conflict", "Action not valid for current pod status"), RunPodRequestError, "409 Conflict"),
        (
            problem(
                422,
                "Unprocessable Entity",
                "Request validation failed.",
                errors=["$: additional properties 'bogus' not allowed", "$.disk: must be >= 1"],
            ),
            RunPodRequestError,
            "422 Unprocessable Entity: Request validation failed. "
            "($: additional properties 'bogus' not allowed; $.disk: must be >= 1)",
        ),
        (
            problem(400, "Bad Request", "this GPU and data center combination could not be placed"),
            NoCapacityError,
            "could not be placed",
        ),
        (
            problem(
                400, "Bad Request", "There are no longer any instances available with the requested specifications."
            ),
            NoCapacityError,
            "no longer any instances",
        ),
        (
            problem(400, "Bad Request", "allowedCudaVersions and minCudaVersion are mutually exclusive"),
            RunPodRequestError,
            "400 Bad Request: allowedCudaVersions",
        ),
        (
            httpx.Response(403, text="error code: 1010\n<html>\n  blocked  </html>"),
            PoolForbiddenError,
            "403 Forbidden: error code: 1010 <html> blocked </html>",
        ),
    ],
    ids=["401", "403", "402", "404", "409", "422", "400-capacity", "400-no-instances", "400-other", "403-not-json"],
)
def test_client_errors_are_raised_at_once(
    client: RunPodClient,
    mocked_runpod: respx.MockRouter,
    sleeps: list[float],
    response: httpx.Response,
    error: type[RunPodError],
    words: str,
) -> None:
    route = mocked_runpod.post("/v2/pods").mock(return_value=response)
    with pytest.raises(error) as caught:
        client.create_pod(vllm_request())
    assert type(caught.value) is error
    assert words in str(caught.value) and str(caught.value).startswith("RunPod POST /v2/pods: ")
    assert caught.value.status == response.status_code
    assert route.call_count == 1 and sleeps == []
    assert_no_key(caught.value)


def test_a_403_is_a_pool_on_create_and_the_key_elsewhere(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    """The spec's create table: 403 = "Your account cannot access the requested pool. Skip this candidate, keep
    going" (exit 1 at worst, after the others). On the key check a 403 is still a key that lacks access (exit 2)."""
    mocked_runpod.post("/v2/pods").mock(return_value=problem(403, "Forbidden", "access denied"))
    mocked_runpod.get("/v2/pods").mock(return_value=problem(403, "Forbidden", "access denied"))
    with pytest.raises(PoolForbiddenError) as pool:
        client.create_pod(vllm_request())
    assert not isinstance(pool.value, RunPodAuthError) and pool.value.exit_code == 1
    with pytest.raises(RunPodAuthError, match="403 Forbidden: access denied") as key:
        client.check_key()
    assert type(key.value) is RunPodAuthError and key.value.exit_code == 2


@pytest.mark.parametrize("wording", ["live", "spec"])
def test_no_capacity_in_either_wording_through_the_fake(wording: str) -> None:
    from tests.fakes.fake_runpod import FakeRunPodSettings, create_app
    from tests.support.servers import LoopbackServer

    app = create_app(FakeRunPodSettings(api_key=KEY, no_capacity_gpu_ids=["NVIDIA L40S"], capacity_wording=wording))
    with (
        LoopbackServer(app) as server,
        RunPodClient(KEY, server.url) as runpod,
        pytest.raises(NoCapacityError) as caught,
    ):
        runpod.create_pod(vllm_request())
    assert (
        str(caught.value)
        == "RunPod POST /v2/pods: 400 Bad Request: "
        + {
            "live": "There are no longer any instances available with the requested specifications. "
            "Please refresh and try again.",  # what RunPod answers (runpod.md 7)
            "spec": "this GPU and data center combination could not be placed",
        }[wording]
    )  # the spec's createPod text
    assert app.state.fake.spec_violations == []


def test_an_echoed_key_is_redacted(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    mocked_runpod.get("/v2/pods").mock(return_value=problem(401, "Unauthorized", f"token {KEY} is revoked"))
    with pytest.raises(RunPodAuthError, match=r"token \*\*\* is revoked") as caught:
        client.list_pods()
    assert_no_key(caught.value)


def test_a_success_that_is_not_json_is_an_error(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    mocked_runpod.get("/v2/pods/p1").respond(200, text="<html>captive portal</html>")
    with pytest.raises(RunPodError, match="not JSON: <html>captive portal</html>"):
        client.get_pod("p1")


# --- retries ------------------------------------------------------------------------------------------------


def test_429_waits_as_told_then_succeeds(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    route = mocked_runpod.get("/v2/pods").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(429),  # no Retry-After: 2 s
            httpx.Response(429, headers={"Retry-After": "600"}),  # capped at 60 s
            httpx.Response(200, json={"pods": [RUNNING_POD]}),
        ]
    )
    assert [pod.id for pod in client.list_pods()] == ["7h9k2m4n6p"]
    assert sleeps == [7.0, 2.0, 60.0]
    assert route.call_count == 4


def test_429_retry_after_as_an_http_date(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    when = formatdate(time.time() + 30, usegmt=True)
    mocked_runpod.delete("/v2/pods/p1").mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": when}), httpx.Response(204)]
    )
    assert client.delete_pod("p1") is True
    assert len(sleeps) == 1 and 27.0 <= sleeps[0] <= 30.0


def test_429_exhausted_raises_rate_limited(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    limited = problem(429, "Too Many Requests", "rate limit exceeded for the minute window")
    limited.headers["Retry-After"] = "3"
    route = mocked_runpod.get("/v2/catalog/gpus").mock(return_value=limited)
    with pytest.raises(RunPodRateLimited, match="rate limit exceeded for the minute window") as caught:
        client.gpu_types()
    assert caught.value.retry_after == 3.0 and caught.value.status == 429
    assert "gave up after 5 attempts" in str(caught.value)
    assert sleeps == [3.0] * 4 and route.call_count == 5
    assert_no_key(caught.value)


def test_create_429_is_retried(client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]) -> None:
    route = mocked_runpod.post("/v2/pods").mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "5"}), httpx.Response(201, json=PROVISIONING_POD)]
    )
    assert client.create_pod(vllm_request()).id == "7h9k2m4n6p"
    assert sleeps == [5.0] and route.call_count == 2


def test_5xx_backs_off_then_succeeds(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    mocked_runpod.get("/v2/pods/p1").mock(
        side_effect=[
            httpx.Response(502, text="Bad Gateway"),
            problem(503, "Service Unavailable", "try later"),
            httpx.Response(200, json=RUNNING_POD),
        ]
    )
    pod = client.get_pod("p1")
    assert pod is not None and pod.running
    assert sleeps == [1.0, 2.0]


def test_5xx_exhausted_raises_unavailable(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    route = mocked_runpod.delete("/v2/pods/p1").respond(503, text="<html><body>\n upstream connect error\n</body>")
    with pytest.raises(RunPodUnavailable) as caught:
        client.delete_pod("p1")
    assert str(caught.value) == (
        "RunPod DELETE /v2/pods/p1: 503 Service Unavailable: <html><body> upstream connect "
        "error </body> (gave up after 5 attempts)"
    )
    assert caught.value.status == 503
    assert sleeps == [1.0, 2.0, 4.0, 8.0] and route.call_count == 5
    assert_no_key(caught.value)


def test_backoff_is_capped_at_30_seconds(mocked_runpod: respx.MockRouter, sleeps: list[float]) -> None:
    mocked_runpod.get("/v2/pods").respond(500)
    runpod = RunPodClient(
        KEY, BASE, transport=httpx.MockTransport(mocked_runpod.handler), max_retries=7, sleep=sleeps.append
    )
    with runpod, pytest.raises(RunPodUnavailable):
        runpod.list_pods()
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize("failure", [httpx.ReadTimeout, httpx.ConnectError, httpx.RemoteProtocolError])
def test_network_failures_are_retried_on_get(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float], failure: type[Exception]
) -> None:
    mocked_runpod.get("/v2/pods").mock(side_effect=[failure, failure, httpx.Response(200, json={"pods": []})])
    assert client.list_pods() == []
    assert sleeps == [1.0, 2.0]


def test_connect_error_exhausted(client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]) -> None:
    mocked_runpod.get("/v2/pods").mock(side_effect=httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(RunPodUnavailable, match=rf"cannot reach {BASE}: connection refused \(gave up") as caught:
        client.list_pods()
    assert caught.value.status is None and len(sleeps) == 4
    assert_no_key(caught.value)


@pytest.mark.parametrize(
    ("failure", "words"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), f"cannot reach {BASE}: connection refused"),
        (httpx.ConnectError("[Errno -2] Name or service not known"), f"cannot reach {BASE}: host name not found (DNS)"),
        (httpx.ConnectError("[Errno 101] Network is unreachable"), f"cannot reach {BASE}: network unreachable"),
        (httpx.ConnectTimeout, f"cannot reach {BASE}: timed out after 10 s"),
        (httpx.ReadTimeout, f"{BASE} did not answer: timed out after 30 s"),
        (
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            f"connection to {BASE} failed: the server closed the connection",
        ),
    ],
    ids=["refused", "dns", "unreachable", "connect-timeout", "read-timeout", "disconnected"],
)
def test_network_failures_name_the_address_and_the_reason(
    mocked_runpod: respx.MockRouter, sleeps: list[float], failure: Any, words: str
) -> None:
    mocked_runpod.get("/v2/pods").mock(side_effect=failure)
    with (
        RunPodClient(
            KEY, BASE, transport=httpx.MockTransport(mocked_runpod.handler), sleep=sleeps.append, max_retries=0
        ) as runpod,
        pytest.raises(RunPodUnavailable) as caught,
    ):
        runpod.list_pods()
    assert str(caught.value) == f"RunPod GET /v2/pods: {words}"
    assert_no_key(caught.value)


def test_a_refused_connection_is_named_as_the_os_reports_it(sleeps: list[float]) -> None:
    """A real socket: nothing listens on the port (bound, never listening), so the OS refuses at once.
    A password in the API address is never shown."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with (
            RunPodClient(KEY, f"http://user:{KEY}@127.0.0.1:{port}", sleep=sleeps.append, max_retries=1) as runpod,
            pytest.raises(RunPodUnavailable) as caught,
        ):
            runpod.list_pods()
    assert str(caught.value) == (
        f"RunPod GET /v2/pods: cannot reach http://127.0.0.1:{port}: connection refused (gave up after 2 attempts)"
    )
    assert_no_key(caught.value)


def test_create_500_is_not_retried(client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]) -> None:
    route = mocked_runpod.post("/v2/pods").mock(return_value=problem(500, "Internal Server Error", "boom"))
    with pytest.raises(RunPodUnavailable, match=r"500 Internal Server Error: boom .*may have been created") as caught:
        client.create_pod(vllm_request())
    assert caught.value.status == 500
    assert route.call_count == 1 and sleeps == []
    assert_no_key(caught.value)


@pytest.mark.parametrize("failure", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError])
def test_create_timeout_is_not_retried(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float], failure: type[Exception]
) -> None:
    route = mocked_runpod.post("/v2/pods").mock(side_effect=failure)
    with pytest.raises(RunPodUnavailable, match="may have been created") as caught:
        client.create_pod(vllm_request())
    assert caught.value.status is None
    assert route.call_count == 1 and sleeps == []


def test_create_connect_error_is_retried(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    """Nothing reached RunPod, so no pod can exist: safe to try again."""
    route = mocked_runpod.post("/v2/pods").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.ConnectTimeout("slow"),
            httpx.Response(201, json=PROVISIONING_POD),
        ]
    )
    assert client.create_pod(vllm_request()).id == "7h9k2m4n6p"
    assert route.call_count == 3 and sleeps == [1.0, 2.0]


# --- logs ---------------------------------------------------------------------------------------------------


def test_pod_logs_reads_the_sse_example(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    body = (
        b"id: 2026-06-01T12:02:03Z/000000000001\n"
        b'data: {"ts":"2026-06-01T12:02:03Z","source":"container","line":"Model loaded."}\n\n'
    )
    route = mocked_runpod.get("/v2/pods/p1/logs").respond(
        200, content=body, headers={"Content-Type": "text/event-stream"}
    )
    assert client.pod_logs("p1", tail=5) == ["Model loaded."]
    request = route.calls.last.request
    assert request.url.query == b"tail=5"
    assert request.headers["Accept"] == "text/event-stream"
    assert request.headers["Authorization"] == f"Bearer {KEY}"


def test_pod_logs_stops_after_tail_lines(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    def forever() -> Iterator[bytes]:
        yield sse(LOG_EVENTS)
        raise AssertionError("read past the requested tail")

    mocked_runpod.get("/v2/pods/p1/logs").respond(200, content=forever())
    assert client.pod_logs("p1", tail=2) == [line for _, line in LOG_EVENTS[:2]]


def test_pod_logs_stops_at_the_read_timeout(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    def then_silence() -> Iterator[bytes]:
        yield sse(LOG_EVENTS[:1])
        raise httpx.ReadTimeout("no more lines within `wait`")

    mocked_runpod.get("/v2/pods/p1/logs").respond(200, content=then_silence())
    assert client.pod_logs("p1") == ["Model loaded."]


def test_pod_logs_stops_at_the_deadline(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    def endless() -> Iterator[bytes]:  # live lines keep arriving, so no read timeout ever fires
        while True:
            yield sse(LOG_EVENTS)
            time.sleep(0.005)

    mocked_runpod.get("/v2/pods/p1/logs").respond(200, content=endless())
    started = time.monotonic()
    lines = client.pod_logs("p1", tail=5000, wait=0.05)
    assert 0 < len(lines) < 5000 and time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "response",
    [
        problem(404, "Not Found", "pod not found"),
        problem(429, "Too Many Requests", "slow down"),
        httpx.Response(500),
        httpx.ConnectError("refused"),
    ],
)
def test_pod_logs_is_best_effort(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float], response: Any
) -> None:
    route = mocked_runpod.get("/v2/pods/p1/logs").mock(side_effect=[response])
    assert client.pod_logs("p1") == []
    assert route.call_count == 1 and sleeps == []


def test_follow_logs_resumes_with_last_event_id(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    def dropped() -> Iterator[bytes]:
        yield sse(LOG_EVENTS[:2])
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    route = mocked_runpod.get("/v2/pods/p1/logs").mock(
        side_effect=[httpx.Response(200, content=dropped()), httpx.Response(200, content=sse(LOG_EVENTS[2:]))]
    )
    assert list(client.follow_logs("p1", tail=50)) == [line for _, line in LOG_EVENTS]

    first, second = (call.request for call in route.calls)
    assert first.url.query == b"tail=50" and "Last-Event-ID" not in first.headers
    assert second.headers["Last-Event-ID"] == "2026-06-01T12:02:04Z/000000000002"
    assert second.headers["Accept"] == "text/event-stream"
    assert sleeps == [1.0]


def test_follow_logs_gives_up_after_repeated_drops(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    def dropped() -> Iterator[bytes]:
        raise httpx.ReadError("connection reset")
        yield b""  # pragma: no cover

    route = mocked_runpod.get("/v2/pods/p1/logs").mock(
        side_effect=lambda request: httpx.Response(200, content=dropped())
    )
    with pytest.raises(RunPodUnavailable, match="log stream dropped 5 times") as caught:
        list(client.follow_logs("p1"))
    assert route.call_count == 5 and sleeps == [1.0, 2.0, 4.0, 8.0]
    assert_no_key(caught.value)


def test_follow_logs_raises_http_errors(client: RunPodClient, mocked_runpod: respx.MockRouter) -> None:
    mocked_runpod.get("/v2/pods/p1/logs").mock(return_value=problem(404, "Not Found", "pod not found"))
    with pytest.raises(RunPodNotFound):
        next(client.follow_logs("p1"))


def test_follow_logs_ends_quietly_when_the_pod_is_gone_on_reopening(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    def then_silence() -> Iterator[bytes]:
        yield sse(LOG_EVENTS[:2])
        raise httpx.ReadTimeout("idle for follow_idle seconds")

    route = mocked_runpod.get("/v2/pods/p1/logs").mock(
        side_effect=[httpx.Response(200, content=then_silence()), problem(404, "Not Found", "pod not found")]
    )
    assert list(client.follow_logs("p1")) == [line for _, line in LOG_EVENTS[:2]]  # terminated meanwhile: the end
    assert route.call_count == 2 and route.calls.last.request.headers["Last-Event-ID"] == LOG_EVENTS[1][0]


def test_follow_logs_reopens_a_silent_stream_without_counting_it(
    client: RunPodClient, mocked_runpod: respx.MockRouter, sleeps: list[float]
) -> None:
    def then_silence() -> Iterator[bytes]:
        yield sse(LOG_EVENTS[:1])
        raise httpx.ReadTimeout("idle for FOLLOW_IDLE seconds")

    route = mocked_runpod.get("/v2/pods/p1/logs").mock(
        side_effect=[httpx.Response(200, content=then_silence()), httpx.Response(200, content=sse(LOG_EVENTS[1:]))]
    )
    assert list(client.follow_logs("p1")) == [line for _, line in LOG_EVENTS]
    assert route.calls.last.request.headers["Last-Event-ID"] == LOG_EVENTS[0][0]
    assert sleeps == []
