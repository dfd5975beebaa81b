"""The fake RunPod API keeps the REST v2 contract (runpod.md sections 1b, 3, 8), and its pods serve a mock vLLM."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import fake_runpod_pods as fake_pods
from tests.fakes.fake_runpod import FakeRunPod, FakeRunPodSettings, create_app, pod_url_template
from tests.fakes.fake_runpod_pods import parse_vllm_args
from tests.support.helpers import wait_until
from tests.support.servers import LoopbackServer, free_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "rpa_fake_test_key"
POD_KEY = "sk-pod-vllm-key"
MODEL = "Qwen/Qwen2.5-7B-Instruct"
# log streams end after their backlog here, so a test can read a log as one body (tests/fakes/test_fake_runpod_logs.py
# reads them open, as RunPod sends them)
FAST = {"provisioning_seconds": 0.05, "starting_seconds": 0.05, "vllm_load_seconds": 0.05, "log_stream_seconds": 0}
IDLE = {"provisioning_seconds": 60.0, "log_stream_seconds": 0}  # pods stay PROVISIONING: no mock vLLM to start or stop
POD_FIELDS = {
    "id",
    "name",
    "status",
    "actions",
    "image",
    "args",
    "disk",
    "mounts",
    "ports",
    "env",
    "registry",
    "cloud",
    "dataCenterId",
    "cudaVersion",
    "ssh",
    "template",
    "cost",
    "locked",
    "runtime",
    "createdAt",
    "startedAt",
    "globalNetworking",
    "gpu",
}


def vllm_body(**overrides: Any) -> dict[str, Any]:
    """The create body llmpod sends (runpod.md 1b, "v2 vLLM create body"), with the image's CUDA floor."""
    return {
        "name": "llmpod-test",
        "image": "vllm/vllm-openai:v0.11.0",
        "gpu": {"id": "NVIDIA RTX A6000", "count": 1, "minCudaVersion": "12.8"},
        "cloud": "SECURE",
        "disk": 60,
        "ports": ["8000/http"],
        "env": {"VLLM_API_KEY": POD_KEY, "HF_TOKEN": "hf_x"},
        "args": f"--model {MODEL} --host 0.0.0.0 --port 8000 --max-model-len 8192",
        **overrides,
    }


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Fake:
    """A running fake: an authenticated client on /v2, the proxy, the /fake routes and the in-process state."""

    def __init__(self, server: LoopbackServer, state: FakeRunPod) -> None:
        self.url, self.state = server.url, state
        self.api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)

    def create(self, **overrides: Any) -> dict[str, Any]:
        response = self.api.post("/v2/pods", json=vllm_body(**overrides))
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def pod_url(self, pod_id: str, port: int = 8000) -> str:
        return pod_url_template(self.url).format(pod_id=pod_id, port=port)

    def proxy_get(self, pod_id: str, path: str, key: str | None = POD_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.pod_url(pod_id) + path, headers=headers, timeout=10)

    def ready(self, **overrides: Any) -> dict[str, Any]:
        pod = self.create(**overrides)
        wait_until(lambda: self.proxy_get(pod["id"], "/health").status_code == 200, "vLLM answers /health")
        return pod

    def configure(self, **switches: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/fake/config", json=switches, timeout=5)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def fake_state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/fake/state", timeout=5).json()  # type: ignore[no-any-return]

    def mock_port(self, pod_id: str) -> int:
        return next(int(p["mockPort"]) for p in self.fake_state()["pods"] if p["id"] == pod_id)


@pytest.fixture
def fake_settings() -> dict[str, Any]:
    return dict(FAST)


@contextlib.contextmanager
def running_fake(settings: dict[str, Any]) -> Iterator[Fake]:
    before = set(threading.enumerate())
    app = create_app(FakeRunPodSettings(api_key=API_KEY, **settings))
    with LoopbackServer(app) as server:
        handle = Fake(server, app.state.fake)
        try:
            with handle.api:
                yield handle
        finally:
            handle.state.stopping.set()  # what the fake's own server does as it stops: open log streams end
    ports = [pod.mock_port for pod in handle.state.pods.values()]
    # tests here send bad requests on purpose; the fake's answers to them must still keep the spec
    answers = [v for v in handle.state.spec_violations if v.startswith("response")]
    assert not answers, answers
    assert not set(threading.enumerate()) - before, "a server thread leaked"
    assert all(refused(port) for port in ports if port), "a pod's mock vLLM still listens"


@pytest.fixture
def fake(fake_settings: dict[str, Any]) -> Iterator[Fake]:
    with running_fake(fake_settings) as handle:
        yield handle


@pytest.fixture
def idle_fake() -> Iterator[Fake]:
    """A fake whose pods never get past PROVISIONING during the test, for tests of the API alone."""
    with running_fake(IDLE) as handle:
        yield handle


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[Fake]:
    """One fake for tests that create nothing (requests that must fail)."""
    with running_fake(FAST) as handle:
        yield handle


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and {"title", "detail"} <= set(body)
    return body


# ---------------------------------------------------------------------------------------------------------
# Auth and the create contract


def test_v2_needs_the_bearer_token(shared_fake: Fake) -> None:
    fake = shared_fake
    assert problem(httpx.get(f"{fake.url}/v2/pods"), 401) == {
        "title": "Unauthorized",
        "status": 401,
        "detail": "missing bearer token",
    }
    wrong = httpx.post(f"{fake.url}/v2/pods", json=vllm_body(), headers={"Authorization": "Bearer nope"})
    assert problem(wrong, 401)["detail"] == "invalid bearer token"
    assert problem(httpx.get(f"{fake.url}/v2/catalog/gpus", headers={"Authorization": API_KEY}), 401)
    assert fake.api.get("/v2/pods").json() == {"pods": []}


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({**vllm_body(), "bogus": 1}, 422, ["$: additional properties 'bogus' not allowed"]),
        (
            vllm_body(gpu={"id": "NVIDIA L40S", "minVcpuCountPerGpu": 4}),
            422,
            ["$.gpu: additional properties 'minVcpuCountPerGpu' not allowed"],
        ),
        (vllm_body(env={"VLLM_API_KEY": POD_KEY, "MAX_JOBS": 4}), 422, ["$.env.MAX_JOBS: got integer, want string"]),
        (vllm_body(name=""), 422, ["$.name: minLength: got 0, want 1"]),
        (vllm_body(args=None), 422, ["$.args: got null, want string"]),
        ({k: v for k, v in vllm_body().items() if k != "image"}, 422, ["$: missing property 'image'"]),
        ({k: v for k, v in vllm_body().items() if k != "gpu"}, 400, "exactly one of gpu or cpu is required"),
        (vllm_body(cpu={"id": "cpu5c", "vcpuCount": 2}), 400, "exactly one of gpu or cpu is required"),
        (vllm_body(gpu={"id": "NVIDIA GeForce GTX 1080"}), 404, "gpu type not found"),
        (vllm_body(gpu={"id": "NVIDIA L40S", "count": 0}), 422, ["$.gpu.count: minimum: got 0, want 1"]),
    ],
)
def test_create_validates_the_body(shared_fake: Fake, body: dict[str, Any], status: int, expected: Any) -> None:
    fake = shared_fake
    answer = problem(fake.api.post("/v2/pods", json=body), status)
    if status == 422:
        assert answer["title"] == "Unprocessable Entity" and answer["errors"] == expected
    else:
        assert answer["detail"] == expected and "errors" not in answer
    assert fake.api.get("/v2/pods").json() == {"pods": []}


# ---------------------------------------------------------------------------------------------------------
# A pod's life: PROVISIONING -> STARTING -> RUNNING -> vLLM listening


@pytest.mark.parametrize(
    "fake_settings", [{"provisioning_seconds": 0.2, "starting_seconds": 0.2, "vllm_load_seconds": 0.2}]
)
def test_pod_progresses_and_vllm_comes_up_last(fake: Fake) -> None:
    created = fake.create()
    assert set(created) == POD_FIELDS and re.fullmatch(r"[a-z0-9]{10}", created["id"])
    assert created["status"] == "PROVISIONING" and created["actions"] == ["stop", "terminate"]
    assert created["runtime"] is None and created["startedAt"] is None and created["cost"] == 0.49
    assert created["env"] == vllm_body()["env"] and created["args"] == vllm_body()["args"]
    assert created["gpu"] == {"id": "NVIDIA RTX A6000", "count": 1}
    assert created["ssh"] == {"proxy": None, "direct": None}
    assert created["mounts"] == {} and created["globalNetworking"] == {"enabled": False} and created["registry"] is None
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pod = fake.api.get(f"/v2/pods/{created['id']}").json()
        health = fake.proxy_get(created["id"], "/health").status_code
        if not seen or seen[-1] != (pod["status"], health):
            seen.append((pod["status"], health))
        if pod["status"] == "STARTING":
            assert pod["actions"] == ["stop", "terminate"] and pod["runtime"] is None
        if pod["status"] == "RUNNING":
            assert pod["actions"] == ["stop", "restart", "terminate"] and pod["startedAt"] is not None
            assert pod["runtime"]["ports"] == [{"private": 8000, "public": None, "type": "http", "ip": None}]
            assert isinstance(pod["runtime"]["uptime"], int)
        if health == 200:
            break
        time.sleep(0.02)
    # a busy machine may poll past a short phase: what is seen must be in order, vLLM answering only last
    # (the fake's own history below shows every phase was passed through)
    order = [("PROVISIONING", 502), ("STARTING", 502), ("RUNNING", 502), ("RUNNING", 200)]
    assert seen[-1] == ("RUNNING", 200) and all(step in order for step in seen), seen
    assert [order.index(step) for step in seen] == sorted(order.index(step) for step in seen), seen
    history = [h["status"] for h in fake.fake_state()["pods"][0]["history"]]
    assert history == ["PROVISIONING", "STARTING", "RUNNING"]


def test_proxy_reaches_the_pods_vllm_with_its_key(fake: Fake) -> None:
    pod = fake.ready(args=f"--model {MODEL} --served-model-name qwen7b --max-model-len 8k --enforce-eager")
    models = fake.proxy_get(pod["id"], "/v1/models?limit=5")
    assert models.status_code == 200, models.text
    card = models.json()["data"][0]
    assert (card["id"], card["root"], card["max_model_len"]) == ("qwen7b", MODEL, 8000)
    assert fake.proxy_get(pod["id"], "/v1/models", key=None).status_code == 401
    assert fake.proxy_get(pod["id"], "/v1/models", key="wrong").json() == {"error": "Unauthorized"}
    assert httpx.get(fake.pod_url(pod["id"], 8888) + "/health").status_code == 404  # not exposed
    assert httpx.get(fake.pod_url("nosuchpod0", 8000) + "/health").status_code == 404


@pytest.mark.parametrize("fake_settings", [{**FAST, "mock_overrides": {"chunk_delay": 0.03}}])
def test_streamed_chat_flows_through_the_proxy_chunk_by_chunk(fake: Fake) -> None:
    pod = fake.ready()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    arrivals: list[tuple[float, str]] = []
    with httpx.stream(
        "POST",
        fake.pod_url(pod["id"]) + "/v1/chat/completions",
        json=body,
        timeout=10,
        headers={"Authorization": f"Bearer {POD_KEY}"},
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        arrivals = [(time.monotonic(), line) for line in response.iter_lines() if line.startswith("data: ")]
    assert len(arrivals) >= 5 and arrivals[-1][1] == "data: [DONE]"
    assert json.loads(arrivals[0][1][6:])["object"] == "chat.completion.chunk"
    assert arrivals[-2][0] - arrivals[0][0] > 0.15  # 12 tokens x 30 ms: not buffered into one piece


@pytest.mark.parametrize("args", ["--model m --host 127.0.0.1 --port 8000", "--model m --port 9000"])
def test_vllm_listening_elsewhere_is_a_502(fake: Fake, args: str) -> None:
    pod = fake.create(args=args)
    wait_until(lambda: pod["id"] in fake.state.listening, "the mock listens")
    assert fake.proxy_get(pod["id"], "/health").status_code == 502


def test_vllm_flags_are_read_like_vllm_reads_them() -> None:
    launch = parse_vllm_args("vllm serve org/m --max-model-len=32K --served-model-name a b --api-key k1", {})
    assert (launch.model, launch.max_model_len, launch.served_model_name, launch.api_key) == ("org/m", 32768, "a", "k1")
    launch = parse_vllm_args("--model 'org/with space' --trust-remote-code --port 8000", {"VLLM_API_KEY": "k2"})
    assert (launch.model, launch.max_model_len, launch.api_key, launch.port) == ("org/with space", None, "k2", 8000)


@pytest.mark.parametrize(
    ("flags", "status"),
    [("--enable-auto-tool-choice --tool-call-parser hermes", 200), ("--tool-call-parser hermes", 400), ("", 400)],
)
def test_a_pods_vllm_calls_tools_only_with_both_tool_flags(fake: Fake, flags: str, status: int) -> None:
    assert parse_vllm_args(f"--model m {flags}", {}).enable_auto_tool_choice == ("--enable" in flags)
    pod = fake.ready(args=f"--model {MODEL} {flags}")
    tool = {
        "type": "function",
        "function": {
            "name": "read_file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    }
    body = {"model": MODEL, "messages": [{"role": "user", "content": "use read_file"}], "tools": [tool]}
    answer = httpx.post(
        fake.pod_url(pod["id"]) + "/v1/chat/completions",
        json=body,
        timeout=10,
        headers={"Authorization": f"Bearer {POD_KEY}"},
    )
    assert answer.status_code == status
    if status == 200:
        assert answer.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "read_file"
    else:
        assert "--enable-auto-tool-choice and --tool-call-parser" in answer.json()["error"]["message"]


def test_list_get_delete(fake: Fake) -> None:
    first, second = fake.ready(name="one"), fake.create(name="two")
    port = fake.mock_port(first["id"])
    assert sorted(p["name"] for p in fake.api.get("/v2/pods").json()["pods"]) == ["one", "two"]
    deleted = fake.api.delete(f"/v2/pods/{first['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert problem(fake.api.get(f"/v2/pods/{first['id']}"), 404) == {
        "title": "Not Found",
        "status": 404,
        "detail": "pod not found",
    }
    assert [p["id"] for p in fake.api.get("/v2/pods").json()["pods"]] == [second["id"]]
    assert problem(fake.api.delete(f"/v2/pods/{first['id']}"), 404)["detail"] == "pod not found"
    assert refused(port)
    assert fake.proxy_get(first["id"], "/health").status_code == 502  # terminated: the proxy has nothing behind it
    gone = next(p for p in fake.fake_state()["pods"] if p["id"] == first["id"])
    assert gone["deleted"] and gone["status"] == "TERMINATED" and gone["history"][-1]["status"] == "TERMINATED"


def test_logs_are_sse_events_without_secrets(fake: Fake) -> None:
    pod = fake.ready(args=f"--model {MODEL} --api-key {POD_KEY}")
    wait_until(lambda: "Application startup complete" in fake.api.get(f"/v2/pods/{pod['id']}/logs").text, "logged")
    response = fake.api.get(f"/v2/pods/{pod['id']}/logs")
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and POD_KEY not in response.text
    events = [block.split("\n") for block in response.text.split("\n\n") if block]
    for id_line, data_line in events:
        data = json.loads(data_line.removeprefix("data: "))
        assert set(data) == {"ts", "source", "line"} and data["source"] in ("container", "system")
        assert id_line == f"id: {data['ts']}/{id_line[-12:]}" and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:]{8}Z", data["ts"])
    lines = [json.loads(data[6:])["line"] for _, data in events]
    assert any("Uvicorn running on http://0.0.0.0:8000" in line for line in lines)
    tail = fake.api.get(f"/v2/pods/{pod['id']}/logs", params={"tail": 2}).text
    assert tail == "\n\n".join("\n".join(event) for event in events[-2:]) + "\n\n"
    assert fake.api.get(f"/v2/pods/{pod['id']}/logs", params={"tail": 0}).text == ""
    system = fake.api.get(f"/v2/pods/{pod['id']}/logs", params={"source": "system"}).text
    assert '"source": "container"' not in system and "Pulling image" in system
    resumed = fake.api.get(f"/v2/pods/{pod['id']}/logs", headers={"Last-Event-ID": events[-3][0][4:]}).text
    assert resumed == tail
    problem(fake.api.get("/v2/pods/nosuchpod0/logs"), 404)


def test_gpu_catalog(idle_fake: Fake) -> None:
    fake = idle_fake
    gpus = fake.api.get("/v2/catalog/gpus").json()["gpus"]
    ids = {gpu["id"] for gpu in gpus}
    assert {
        "NVIDIA RTX A6000",
        "NVIDIA L40S",
        "NVIDIA GeForce RTX 4090",
        "NVIDIA A100 80GB PCIe",
        "NVIDIA H100 80GB HBM3",
    } <= ids
    for gpu in gpus:
        assert {"id", "name", "pool", "manufacturer", "memory", "secure", "community", "price", "maxCount"} == set(gpu)
    a6000 = fake.api.get("/v2/catalog/gpus/NVIDIA%20RTX%20A6000").json()
    assert (a6000["memory"], a6000["price"]["secure"], a6000["price"]["community"]) == (48, 0.49, 0.33)
    assert problem(fake.api.get("/v2/catalog/gpus", params={"include": "AVAILABILITY"}), 400)
    assert problem(fake.api.get("/v2/catalog/gpus", params={"product": "POD"}), 400)
    assert problem(fake.api.get("/v2/catalog/gpus/NVIDIA%20GTX%20480"), 404)["detail"] == "gpu type not found"
    fake.configure(no_capacity_gpu_ids=["NVIDIA L40S"])
    query = {"include": "AVAILABILITY", "product": "POD", "cloud": "SECURE"}
    listed = {g["id"]: g for g in fake.api.get("/v2/catalog/gpus", params=query).json()["gpus"]}
    assert listed["NVIDIA L40S"]["availability"] == "NONE" and "dataCenters" not in listed["NVIDIA L40S"]
    assert listed["NVIDIA RTX A6000"]["availability"] == "HIGH"
    assert listed["NVIDIA RTX A6000"]["dataCenters"][0] == {
        "id": "US-KS-2",
        "name": "US Kansas 2",
        "availability": "HIGH",
    }


# ---------------------------------------------------------------------------------------------------------
# Fault switches


def test_no_capacity(idle_fake: Fake) -> None:
    fake = idle_fake
    fake.configure(no_capacity_gpu_ids=["NVIDIA RTX A6000"])
    live = fake_pods.NO_CAPACITY_LIVE  # "There are no longer any instances available with the requested ..."
    assert problem(fake.api.post("/v2/pods", json=vllm_body()), 400) == {
        "title": "Bad Request",
        "status": 400,
        "detail": live,
    }  # RunPod's words in practice (runpod.md 7)
    too_many = vllm_body(cloud="COMMUNITY", gpu={"id": "NVIDIA GeForce RTX 4090", "count": 8})  # 4 at most there
    assert problem(fake.api.post("/v2/pods", json=too_many), 400)["detail"] == live
    fake.configure(capacity_wording="spec")
    assert problem(fake.api.post("/v2/pods", json=vllm_body()), 400)["detail"] == (
        "this GPU and data center combination could not be placed"
    )  # the spec's own description of that 400
    assert fake.create(gpu={"id": "NVIDIA L40S", "count": 2})["cost"] == 1.72


def test_rate_limit(idle_fake: Fake) -> None:
    fake = idle_fake
    fake.configure(rate_limit_next=2, retry_after=3)
    for _ in range(2):
        limited = fake.api.get("/v2/pods")
        assert problem(limited, 429)["detail"] == "rate limit exceeded for the minute window"
        assert limited.headers["retry-after"] == "3"
    assert fake.api.get("/v2/pods").status_code == 200


def test_500_after_create_leaves_the_pod(idle_fake: Fake) -> None:
    fake = idle_fake
    fake.configure(create_500_after_create=1)
    problem(fake.api.post("/v2/pods", json=vllm_body(name="orphan")), 500)
    assert [p["name"] for p in fake.api.get("/v2/pods").json()["pods"]] == ["orphan"]
    assert fake.create(name="second")["name"] == "second"


def test_slow_create_times_out_client_side_but_makes_the_pod(idle_fake: Fake) -> None:
    fake = idle_fake
    fake.configure(create_delay=0.3)
    with pytest.raises(httpx.ReadTimeout):
        fake.api.post("/v2/pods", json=vllm_body(name="slow"), timeout=0.05)
    assert [p["name"] for p in fake.api.get("/v2/pods").json()["pods"]] == ["slow"]


def test_delete_fails_twice_then_works(idle_fake: Fake) -> None:
    fake = idle_fake
    pod = fake.create()
    fake.configure(delete_500_next=2)
    for _ in range(2):
        problem(fake.api.delete(f"/v2/pods/{pod['id']}"), 500)
        assert fake.api.get(f"/v2/pods/{pod['id']}").status_code == 200
    assert fake.api.delete(f"/v2/pods/{pod['id']}").status_code == 204


def test_balance_exhausted_and_revoked_key(idle_fake: Fake) -> None:
    fake = idle_fake
    fake.configure(balance_exhausted=True)
    assert problem(fake.api.post("/v2/pods", json=vllm_body()), 402)["title"] == "Payment Required"
    answer = fake.configure(balance_exhausted=False, revoked=True)
    assert answer["api_key"] == "**********" and API_KEY not in json.dumps(answer)
    for path in ("/v2/pods", "/v2/catalog/gpus", "/v2/pods/abc"):
        assert problem(fake.api.get(path), 401)["detail"] == "invalid bearer token"
    problem(httpx.post(f"{fake.url}/fake/config", json={"bogus": True}), 422)


def test_a_crashed_pod(fake: Fake) -> None:
    pod = fake.ready()
    port = fake.mock_port(pod["id"])
    died = httpx.post(f"{fake.url}/fake/pods/{pod['id']}/die")
    assert died.status_code == 200 and died.json()["status"] == "ERROR"
    now = fake.api.get(f"/v2/pods/{pod['id']}").json()
    assert (now["status"], now["cost"], now["runtime"], now["actions"]) == ("ERROR", 0.0, None, ["start", "terminate"])
    assert refused(port) and fake.proxy_get(pod["id"], "/health").status_code == 502
    assert "EngineCore" in fake.api.get(f"/v2/pods/{pod['id']}/logs").text
    assert fake.api.delete(f"/v2/pods/{pod['id']}").status_code == 204


@pytest.mark.parametrize("fake_settings", [{**FAST, "mock_overrides": {"chunk_delay": 0.05}}])
def test_a_crash_cuts_the_answer_in_flight(fake: Fake) -> None:
    pod = fake.ready()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    lines: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            fake.pod_url(pod["id"]) + "/v1/chat/completions",
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {POD_KEY}"},
        ) as response,
    ):
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) == 2:
                httpx.post(f"{fake.url}/fake/pods/{pod['id']}/die").raise_for_status()
    assert "data: [DONE]" not in lines


def test_a_vanished_pod(fake: Fake) -> None:
    pod = fake.ready()
    assert httpx.post(f"{fake.url}/fake/pods/{pod['id']}/vanish").status_code == 204
    problem(fake.api.get(f"/v2/pods/{pod['id']}"), 404)
    problem(fake.api.delete(f"/v2/pods/{pod['id']}"), 404)
    assert fake.api.get("/v2/pods").json() == {"pods": []}
    assert fake.proxy_get(pod["id"], "/health").status_code == 404
    assert refused(fake.mock_port(pod["id"]))


def test_state_counts_calls_per_route(idle_fake: Fake) -> None:
    fake = idle_fake
    pod = fake.create()
    fake.api.get(f"/v2/pods/{pod['id']}")
    fake.api.get(f"/v2/pods/{pod['id']}")
    httpx.get(f"{fake.url}/v2/pods")
    fake.api.delete(f"/v2/pods/{pod['id']}")
    state = fake.fake_state()
    assert state["calls"] == {
        "POST /v2/pods": 1,
        "GET /v2/pods/{pod_id}": 2,
        "GET /v2/pods": 1,
        "DELETE /v2/pods/{pod_id}": 1,
    }
    assert [p["id"] for p in state["pods"]] == [pod["id"]] and state["pods"][0]["deleted"]


# ---------------------------------------------------------------------------------------------------------
# As a process


def test_runs_as_a_process_and_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    env = {**os.environ, "FAKE_RUNPOD_API_KEY": API_KEY, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.fake_runpod",
            "--port",
            str(port),
            "--provisioning-seconds",
            "0",
            "--starting-seconds",
            "0",
            "--vllm-load-seconds",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        readable, _, _ = select.select([process.stderr], [], [], 15)
        assert readable and process.stderr.readline().strip() == f"fake RunPod listening on http://127.0.0.1:{port}"
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {API_KEY}"}
        created = httpx.post(f"{url}/v2/pods", json=vllm_body(), headers=auth, timeout=10)
        assert created.status_code == 201, created.text
        pod_url = pod_url_template(url).format(pod_id=created.json()["id"], port=8000)
        wait_until(lambda: httpx.get(pod_url + "/health").status_code == 200, "the pod's vLLM answers")
        mock_port = httpx.get(f"{url}/fake/state").json()["pods"][0]["mockPort"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
        assert process.returncode == 0, stderr
        assert refused(port) and refused(mock_port)
        assert API_KEY not in stderr and POD_KEY not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ("--enable-auto-tool-choice", "--enable-auto-tool-choice requires --tool-call-parser"),
        ("--enable-auto-tool-choice --tool-call-parser nope", "invalid tool call parser: nope"),
    ],
)
def test_a_pod_whose_vllm_refuses_its_tool_flags_exits_at_start(fake: Fake, flags: str, reason: str) -> None:
    # vLLM 0.33 checks these flags before loading anything and exits 1 (vllm/entrypoints/common/cli_args.py:554,
    # :620; seen on its real server): the pod never serves, whatever the mock would have accepted
    pod = fake.create(args=f"--model {MODEL} {flags}")
    wait_until(lambda: fake.api.get(f"/v2/pods/{pod['id']}").json()["status"] == "ERROR", "the container exits")
    logs = fake.api.get(f"/v2/pods/{pod['id']}/logs").text
    assert reason in logs and "Container exited with status 1" in logs and "startup complete" not in logs
    assert fake.proxy_get(pod["id"], "/health").status_code == 502
    [state] = fake.fake_state()["pods"]
    assert not state["mockListening"] and [h["status"] for h in state["history"]][-1] == "ERROR"
    assert fake.api.delete(f"/v2/pods/{pod['id']}").status_code == 204


def test_an_unknown_parser_without_auto_tool_choice_is_not_checked(fake: Fake) -> None:
    pod = fake.ready(args=f"--model {MODEL} --tool-call-parser nope")  # vLLM reads the parser only with the switch
    assert fake.api.get(f"/v2/pods/{pod['id']}").json()["status"] == "RUNNING"


# ------------------------------------------------------------------------------------- hosts and crash loops
def test_an_image_on_a_host_too_old_for_it_is_refused_at_every_start_while_running(fake: Fake) -> None:
    # no floor: the fake places the pod on its oldest host, as RunPod may; vLLM 0.33's image needs CUDA 13, and its
    # nvidia/cuda base makes the container runtime refuse it there (RunPod's system log, Nerogar/OneTrainer#981)
    pod = fake.create(image="vllm/vllm-openai:v0.33.0", gpu={"id": "NVIDIA RTX A6000", "count": 1})
    assert pod["cudaVersion"] == "12.4"
    refused = "nvidia-container-cli: requirement error: unsatisfied condition: cuda>=13.0"
    wait_until(lambda: fake.api.get(f"/v2/pods/{pod['id']}/logs").text.count(refused) >= 2, "refused twice")
    now = fake.api.get(f"/v2/pods/{pod['id']}").json()
    assert now["status"] == "RUNNING" and now["cost"] > 0  # billed, and it reads as if all were well
    assert now["runtime"] is None  # no container ever ran: no uptime to watch
    assert fake.proxy_get(pod["id"], "/health").status_code == 502
    assert "start container for vllm/vllm-openai:v0.33.0: begin" in fake.api.get(f"/v2/pods/{pod['id']}/logs").text


def test_with_the_runtime_gate_off_vllm_dies_at_every_start_instead(fake: Fake) -> None:
    # NVIDIA_DISABLE_REQUIRE (NVIDIA's workaround for the gate) lets the container start; PyTorch then finds the
    # driver too old and vLLM no device
    pod = fake.create(
        image="vllm/vllm-openai:v0.33.0",
        gpu={"id": "NVIDIA RTX A6000", "count": 1},
        env={"NVIDIA_DISABLE_REQUIRE": "true"},
    )
    wait_until(
        lambda: "Failed to infer device type" in fake.api.get(f"/v2/pods/{pod['id']}/logs").text,
        "the container dies at start",
    )
    now = fake.api.get(f"/v2/pods/{pod['id']}").json()
    assert now["status"] == "RUNNING" and now["runtime"]["uptime"] >= 0
    assert "driver on your system is too old (found version 12040)" in fake.api.get(f"/v2/pods/{pod['id']}/logs").text


def test_a_cuda_floor_keeps_the_pod_on_a_host_that_can_start_it(fake: Fake) -> None:
    pod = fake.create(
        image="vllm/vllm-openai:v0.33.0", gpu={"id": "NVIDIA RTX A6000", "count": 1, "minCudaVersion": "13.0"}
    )
    assert pod["cudaVersion"] == "13.0"
    wait_until(lambda: fake.proxy_get(pod["id"], "/health").status_code == 200, "vLLM answers /health")


def test_a_crash_looping_container_restarts_with_its_uptime_from_zero() -> None:
    body = vllm_body(image="vllm/vllm-openai:v0.33.0")
    pod = fake_pods.FakePod(
        fake_pods.parse_create(body), fake_pods.GPUS["NVIDIA RTX A6000"], "US-KS-2", "12.4", 0.0, 0.0, 0.0
    )
    pod.crash = fake_pods.CrashLoop(("torch.OutOfMemoryError: CUDA out of memory.",), after=3.0)
    assert [pod.view(pod.running_at + t)["runtime"]["uptime"] for t in (1.0, 2.5, 3.5, 6.2)] == [1, 2, 0, 0]
    lines = [item["line"] for item in pod.logs(pod.running_at + 7.0)]
    assert sum("vLLM API server version 0.33.0" in line for line in lines) == 3  # three starts so far
    assert lines.count("torch.OutOfMemoryError: CUDA out of memory.") == 2
    assert lines.count("Container exited with status 1") == 2
    assert pod.view(pod.running_at + 7.0)["status"] == "RUNNING"


@pytest.mark.parametrize("fake_settings", [{**FAST, "host_cuda": "12.4"}])
def test_the_host_cuda_switch_places_a_pod_below_its_floor(fake: Fake) -> None:
    pod = fake.create(
        image="vllm/vllm-openai:v0.33.0", gpu={"id": "NVIDIA RTX A6000", "count": 1, "minCudaVersion": "13.0"}
    )
    assert pod["cudaVersion"] == "12.4"  # whatever the request asked
    wait_until(
        lambda: "unsatisfied condition: cuda>=13.0" in fake.api.get(f"/v2/pods/{pod['id']}/logs").text,
        "the container runtime refuses it",
    )
    assert fake.api.get(f"/v2/pods/{pod['id']}").json()["status"] == "RUNNING"


@pytest.mark.parametrize("fake_settings", [{**FAST, "crash_loop": ["OSError: gated repo"], "crash_after_seconds": 0.5}])
def test_the_crash_loop_switch(fake: Fake) -> None:
    pod = fake.create()
    wait_until(
        lambda: fake.api.get(f"/v2/pods/{pod['id']}/logs").text.count("OSError: gated repo") >= 2,
        "the container dies twice",
    )
    assert fake.api.get(f"/v2/pods/{pod['id']}").json()["status"] == "RUNNING"
    assert fake.proxy_get(pod["id"], "/health").status_code == 502
