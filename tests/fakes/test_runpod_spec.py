"""The spec validator (tests/fakes/runpod_spec.py) and its middleware on the fake RunPod
(tests/fakes/runpod_spec_asgi.py): what breaks the official spec is reported, and what keeps it (the spec's own
examples, the fake's traffic) is not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.fake_runpod import FakeRunPodSettings, create_app
from tests.fakes.runpod_spec import SPEC_PATH, RunPodSpec
from tests.fakes.runpod_spec_asgi import SpecCheck
from tests.support.servers import LoopbackServer

SHARED_SPEC = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "runpod-v2-openapi.json"
KEY = "rpa_spec_test_key"
GOOD_CREATE = {
    "name": "llmpod-ab12",
    "image": "vllm/vllm-openai:v0.33.0",
    "disk": 60,
    "ports": ["8000/http"],
    "env": {"VLLM_API_KEY": "sk-hidden-value"},
    "cloud": "SECURE",
    "args": "--model m",
    "gpu": {"id": "NVIDIA RTX A6000", "count": 1, "minCudaVersion": "13.0"},
}
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def spec() -> RunPodSpec:
    return RunPodSpec()


def test_the_vendored_spec_is_the_shared_reference() -> None:
    if not SHARED_SPEC.exists():
        pytest.skip(f"no shared reference copy at {SHARED_SPEC} (a plain clone has only the vendored one)")
    assert SPEC_PATH.read_bytes() == SHARED_SPEC.read_bytes()


def test_the_spec_is_the_one_llmpod_was_checked_against(spec: RunPodSpec) -> None:
    assert spec.document["openapi"] == "3.1.0" and spec.document["info"]["version"] == "2.0.0"
    used = {
        "GET /v2/pods",
        "POST /v2/pods",
        "GET /v2/pods/{id}",
        "DELETE /v2/pods/{id}",
        "GET /v2/pods/{id}/logs",
        "GET /v2/catalog/gpus",
        "GET /v2/catalog/gpus/{id}",
    }
    assert used <= {str(op) for op in spec.operations}


def _examples(spec: RunPodSpec) -> Iterator[tuple[str, Any]]:
    for op in spec.operations:
        if op.template.startswith("/v2/serverless"):
            continue  # its examples' URLs hold "{job_id}", which no `format: uri` string may: the spec disagrees
        path = op.template.replace("{", "").replace("}", "")
        for media, content in (spec.resolve(op.spec.get("requestBody")) or {}).get("content", {}).items():
            for example in content.get("examples", {}).values():
                yield (
                    f"{op} request",
                    spec.request_errors(op.method, path, "", json.dumps(example["value"]).encode(), media),
                )
        for status, declared in op.spec["responses"].items():
            for media, content in spec.resolve(declared).get("content", {}).items():
                for example in content.get("examples", {}).values():
                    value = example["value"]
                    # the log example stops before the blank line that ends (dispatches) an SSE event
                    body = (value + "\n").encode() if isinstance(value, str) else json.dumps(value).encode()
                    code = int(status) if status.isdigit() else 500
                    yield f"{op} {status}", spec.response_errors(op.method, path, code, media, body)


def test_the_specs_own_examples_keep_it(spec: RunPodSpec) -> None:
    checked = list(_examples(spec))
    assert len(checked) > 30
    assert [(where, errors) for where, errors in checked if errors] == []


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "expected"),
    [
        (
            "POST",
            "/v2/pods",
            "",
            {**GOOD_CREATE, "gpu": {"id": "NVIDIA RTX A6000", "count": "1"}},
            'POST /v2/pods: body $.gpu.count: "1" is not of type "integer"',
        ),
        (
            "POST",
            "/v2/pods",
            "",
            {**GOOD_CREATE, "gpuCount": 1},
            "POST /v2/pods: body $: Unevaluated properties are not allowed ('gpuCount' was unexpected)",
        ),
        (
            "POST",
            "/v2/pods",
            "",
            {**GOOD_CREATE, "gpu": {"id": "NVIDIA RTX A6000", "minCudaVersion": "13"}},
            'POST /v2/pods: body $.gpu.minCudaVersion: "13" does not match "^\\d+\\.\\d+$"',
        ),
        ("POST", "/v2/pods", "", None, "POST /v2/pods: no request body, where the spec requires one"),
        ("GET", "/v2/pod", "", None, "GET /v2/pod: no such operation in the spec"),
        ("PUT", "/v2/pods/abc", "", None, "PUT /v2/pods/abc: no such operation in the spec"),
        (
            "GET",
            "/v2/pods/abc/logs",
            "tail=9999",
            None,
            "GET /v2/pods/{id}/logs: query tail: 9999 is greater than the maximum of 5000",
        ),
        (
            "GET",
            "/v2/pods/abc/logs",
            "lines=5",
            None,
            "GET /v2/pods/{id}/logs: query lines: not a parameter of GET /v2/pods/{id}/logs",
        ),
        (
            "GET",
            "/v2/catalog/gpus",
            "include=AVAILABILITY&product=POD&cloud=ALL",
            None,
            'GET /v2/catalog/gpus: query cloud: "ALL" is not one of "SECURE" or "COMMUNITY"',
        ),
        (
            "GET",
            "/v2/catalog/gpus",
            "include=AVAILABILITY&product=POD&count=two",
            None,
            'GET /v2/catalog/gpus: query count: "two" is not of type "integer"',
        ),
        ("DELETE", "/v2/pods/abc", "", {}, "DELETE /v2/pods/{id}: a request body, where the spec has none"),
    ],
)
def test_a_bad_request_is_reported(
    spec: RunPodSpec, method: str, path: str, query: str, body: Any, expected: str
) -> None:
    raw = b"" if body is None else json.dumps(body).encode()
    assert spec.request_errors(method, path, query, raw, "application/json" if raw else None) == [expected]


def test_good_requests_are_not_reported(spec: RunPodSpec) -> None:
    assert spec.request_errors("POST", "/v2/pods", "", json.dumps(GOOD_CREATE).encode(), "application/json") == []
    assert (
        spec.request_errors(
            "GET", "/v2/catalog/gpus", "include=AVAILABILITY&product=POD&cloud=SECURE&minCudaVersion=13.0"
        )
        == []
    )
    assert spec.request_errors("GET", "/v2/pods/abc/logs", "tail=100&source=container") == []
    assert spec.request_errors("DELETE", "/v2/pods/abc") == []


def test_a_secret_in_a_bad_env_is_never_quoted(spec: RunPodSpec) -> None:
    body = {**GOOD_CREATE, "env": {"VLLM_API_KEY": ["sk-hidden-value"]}}
    [error] = spec.request_errors("POST", "/v2/pods", "", json.dumps(body).encode(), "application/json")
    assert "$.env.VLLM_API_KEY" in error and "sk-hidden-value" not in error


@pytest.mark.parametrize(
    ("status", "media", "body", "headers", "expected"),
    [
        (200, "application/json", {"id": "p1", "name": "x"}, {}, 'body $: "status" is a required property'),
        (
            404,
            "application/json",
            {"title": "Not Found", "status": 404, "detail": "pod not found"},
            {},
            "content type application/json, the spec says application/problem+json",
        ),
        (
            404,
            PROBLEM,
            {"title": "Not Found", "status": 400, "detail": "pod not found"},
            {},
            "body $.status: 400, but the HTTP status is 404",
        ),
        (404, PROBLEM, {"message": "pod not found"}, {}, 'body $: "title" is a required property'),
        (
            429,
            PROBLEM,
            {"title": "Too Many Requests", "status": 429, "detail": "slow down"},
            {"Retry-After": "soon"},
            'header Retry-After: "soon" is not of type "integer"',
        ),
    ],
)
def test_a_bad_response_is_reported(
    spec: RunPodSpec, status: int, media: str, body: Any, headers: dict[str, str], expected: str
) -> None:
    errors = spec.response_errors("GET", "/v2/pods/p1", status, media, json.dumps(body).encode(), headers)
    assert f"GET /v2/pods/{{id}} -> {status}: {expected}" in errors


def test_a_bad_log_event_or_a_body_on_a_204_is_reported(spec: RunPodSpec) -> None:
    event = b'id: 2026-06-01T12:02:03Z/1\ndata: {"ts": "2026-06-01T12:02:03Z", "source": "stdout", "line": "x"}\n\n'
    [error] = spec.response_errors("GET", "/v2/pods/p1/logs", 200, "text/event-stream", event)
    assert error.endswith('log event data $.source: "stdout" is not one of "container" or "system"')
    assert spec.response_errors("DELETE", "/v2/pods/p1", 204, "application/json", b"{}") == [
        "DELETE /v2/pods/{id} -> 204: a body, where the spec has none: {}"
    ]


# --------------------------------------------------------------------------------------------- the middleware
def _bad_runpod(request: Request) -> Response:
    """A RunPod that answers a pod without most of its fields, and a 404 as plain JSON."""
    if request.path_params["pod_id"] == "missing":
        return JSONResponse({"message": "Pod not found"}, status_code=404)
    return JSONResponse({"id": "p1", "name": "x", "status": "RUNNING"})


def test_the_middleware_reports_bad_answers() -> None:
    violations: list[str] = []
    app = Starlette(routes=[Route("/v2/pods/{pod_id}", _bad_runpod)])
    with LoopbackServer(SpecCheck(app, record=violations.append)) as server:
        assert httpx.get(f"{server.url}/v2/pods/p1", timeout=5).status_code == 200
        assert httpx.get(f"{server.url}/v2/pods/missing", timeout=5).status_code == 404
    assert 'response GET /v2/pods/{id} -> 200: body $: "image" is a required property' in violations
    assert (
        "response GET /v2/pods/{id} -> 404: content type application/json, the spec says application/problem+json"
    ) in violations


def test_the_fake_records_bad_requests_and_passes_good_ones() -> None:
    app = create_app(FakeRunPodSettings(api_key=KEY, provisioning_seconds=60.0))
    fake = app.state.fake
    with (
        LoopbackServer(app) as server,
        httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as api,
    ):
        created = api.post("/v2/pods", json=GOOD_CREATE)
        assert created.status_code == 201
        assert api.get("/v2/catalog/gpus", params={"include": "AVAILABILITY", "product": "POD"}).status_code == 200
        assert api.get("/v2/pods").status_code == 200
        assert fake.take_violations() == []
        bad = {**GOOD_CREATE, "gpu": {"id": "NVIDIA RTX A6000", "count": "2"}}
        assert api.post("/v2/pods", json=bad).status_code == 422  # the fake refuses it, as RunPod would
        assert api.get(f"/v2/pods/{created.json()['id']}/logs", params={"tail": "all"}).status_code == 422
        assert api.get("/v2/volumes").status_code == 404
        assert "specViolations" in api.get("/fake/state").json()
        taken = fake.take_violations()
    assert taken == [
        'request POST /v2/pods: body $.gpu.count: "2" is not of type "integer"',
        'request GET /v2/pods/{id}/logs: query tail: "all" is not of type "integer"',
        "request GET /v2/volumes: no such operation in the spec",
    ]
    assert fake.spec_violations == []
