"""Several models behind one proxy (issue 18), the proxy's side: two in-process mock vLLM servers as backends.

Routing by the body's model and by ``/llm/{id}/`` (both the ``/v1`` form and the FluidMCP guide's), the unknown
model's 404, answers that never mix across models under concurrency, a backend killed with requests in flight
and brought back, the supervisor's state file, and the per-model metrics (the guide's Tests 1-3).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpod.backends import Backend, BackendState, write_state
from llmpod.mock.server import create_app as create_mock
from llmpod.mock.state import MockSettings
from llmpod.proxy.app import create_app
from llmpod.proxy.settings import ProxySettings
from tests.faults.answers import ERROR_FIELDS, judge
from tests.support.helpers import wait_until
from tests.support.servers import LoopbackServer

CHUNKS = 6


class PortServer(LoopbackServer):
    """A ``LoopbackServer`` on a port chosen beforehand: a backend restarted where the proxy expects it."""

    def __init__(self, app: Any, port: int) -> None:
        super().__init__(app)
        self._sock.close()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = port


def mock_app(name: str, **extra: Any) -> Any:
    return create_mock(MockSettings(model=name, chunk_count=CHUNKS, **extra))


class Models:
    """Two mock backends (``gpt`` serving ``mock-gpt``, ``llama`` serving ``mock-llama``) behind one proxy."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.gpt = LoopbackServer(mock_app("mock-gpt")).start()
        self.llama = LoopbackServer(mock_app("mock-llama", chunk_delay=0.0)).start()
        self.state_file = tmp_path / "gpt.state"
        self.proxy: LoopbackServer | None = None

    def start_proxy(self, **overrides: Any) -> httpx.Client:
        backends = (
            Backend(
                id="gpt",
                base_url=f"{self.gpt.url}/v1",
                served_model="mock-gpt",
                aliases=("chat",),
                kind="mock",
                state_file=str(self.state_file),
            ),
            Backend(id="llama", base_url=f"{self.llama.url}/v1", served_model="mock-llama", kind="mock"),
        )
        values: dict[str, Any] = {
            "cache_dir": self.tmp_path / "cache",
            "log_file": self.tmp_path / "proxy.log",
            "upstream_timeout": 10.0,
            "backends": backends,
            "health_interval": 0.2,
            **overrides,
        }
        self.proxy = LoopbackServer(create_app(ProxySettings(**values))).start()
        return httpx.Client(base_url=self.proxy.url, timeout=20)

    def stop(self) -> None:
        for server in (self.proxy, self.gpt, self.llama):
            if server is not None:
                server.stop()


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Models]:
    running = Models(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def http(models: Models) -> Iterator[httpx.Client]:
    with models.start_proxy() as client:
        wait_until(lambda: client.get("/health").json()["status"] == "healthy", "both models healthy", timeout=15)
        yield client


def chat(prompt: str, model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32}
    if model is not None:
        body["model"] = model
    return body


def check_answer(response: httpx.Response, body: dict[str, Any], served: str) -> None:
    """The complete answer the mock serving ``served`` gives to ``body``, and nobody else's."""
    verdict = judge({**body, "model": served}, response.status_code, response.text, None, None, chunk_count=CHUNKS)
    assert verdict.outcome == "answer", verdict.detail
    assert response.json()["model"] == served


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"]
    return error  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------- routing
def test_the_body_model_chooses_the_backend_by_id_or_alias(http: httpx.Client) -> None:
    names = [("gpt", "mock-gpt"), ("chat", "mock-gpt"), ("llama", "mock-llama"), ("LLAMA", "mock-llama")]
    names += [("mock-llama", "mock-llama"), ("org/Mock-GPT", "mock-gpt")]  # its server's name, as with one upstream
    for name, served in names:
        body = chat(f"which model answers {name}?", name)
        check_answer(http.post("/v1/chat/completions", json=body), body, served)
    assert_openai_error(http.post("/v1/chat/completions", json=chat("which?", "mock")), 404)  # both: ambiguous
    stream = {**chat("a streamed answer", "llama"), "stream": True}
    answer = http.post("/llm/llama/v1/chat/completions", json=stream)
    verdict = judge({**stream, "model": "mock-llama"}, 200, answer.text, None, None, chunk_count=CHUNKS)
    assert verdict.outcome == "answer", verdict.detail
    completion = http.post("/v1/completions", json={"model": "llama", "prompt": "def add(a, b):", "max_tokens": 8})
    assert completion.status_code == 200 and completion.json()["model"] == "mock-llama"


@pytest.mark.parametrize("prefix", ["/llm/{id}/v1", "/llm/{id}"])
def test_llm_paths_route_to_their_model_whatever_the_body_names(http: httpx.Client, prefix: str) -> None:
    for model_id, served in (("gpt", "mock-gpt"), ("llama", "mock-llama")):
        base = prefix.format(id=model_id)
        for body in (chat(f"routed to {model_id}"), chat(f"routed to {model_id}", "some-other-model")):
            check_answer(http.post(f"{base}/chat/completions", json=body), chat(f"routed to {model_id}"), served)
        completion = http.post(f"{base}/completions", json={"prompt": "x = ", "max_tokens": 4})
        assert completion.status_code == 200 and completion.json()["model"] == served
        listing = http.get(f"{base}/models").json()
        assert [card["id"] for card in listing["data"]] == [model_id]
    assert_openai_error(http.post("/llm/nope/chat/completions", json=chat("hi")), 404)


def test_llm_path_and_plain_route_share_cache_entries_but_models_never_do(http: httpx.Client) -> None:
    first = http.post("/llm/gpt/chat/completions", json=chat("shared prompt"))
    again = http.post("/v1/chat/completions", json=chat("shared prompt", "gpt"))
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert first.headers["x-cache-key"] == again.headers["x-cache-key"]
    other = http.post("/v1/chat/completions", json=chat("shared prompt", "llama"))
    assert other.headers["x-cache"] == "MISS" and other.json()["model"] == "mock-llama"


def test_two_backends_serving_the_same_name_never_share_answers(tmp_path: Path) -> None:
    with (
        LoopbackServer(mock_app("same-name")) as one,
        LoopbackServer(mock_app("same-name")) as two,
    ):
        backends = tuple(
            Backend(id=model_id, base_url=f"{server.url}/v1", served_model="same-name", kind="mock")
            for model_id, server in (("one", one), ("two", two))
        )
        settings = ProxySettings(cache_dir=tmp_path / "cache", log_file=None, backends=backends, health_interval=0.2)
        with LoopbackServer(create_app(settings)) as proxy, httpx.Client(base_url=proxy.url, timeout=20) as client:
            first = client.post("/v1/chat/completions", json=chat("same question", "one"))
            second = client.post("/v1/chat/completions", json=chat("same question", "two"))
            assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "MISS")
            assert httpx.get(f"{two.url}/mock/stats").json()["requests"]["chat.completions"] == 1


def test_unknown_model_is_vllms_404_listing_the_models(http: httpx.Client) -> None:
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat("hi", "gpt-5")), 404)
    assert error["type"] == "NotFoundError" and error["param"] == "model"
    assert "gpt-5" in error["message"] and "gpt, llama" in error["message"]
    missing = assert_openai_error(http.post("/v1/chat/completions", json=chat("hi")), 400)
    assert "gpt, llama" in missing["message"]


def test_models_lists_every_model_with_its_state(http: httpx.Client) -> None:
    listing = http.get("/v1/models").json()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    assert set(cards) == {"gpt", "llama"}
    assert all(card["object"] == "model" and card["state"] == "healthy" for card in cards.values())
    assert cards["gpt"]["aliases"] == ["chat"]


# ----------------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_across_models_never_mix_up(models: Models, http: httpx.Client) -> None:
    assert models.proxy is not None
    bodies = [(chat(f"request {n}: say {n * 7}", ("gpt", "llama")[n % 2])) for n in range(50)]
    bodies += [chat("the same prompt to both", model) for model in ("gpt", "llama") for _ in range(5)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=models.proxy.url, timeout=30) as client:  # type: ignore[union-attr]
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for body in bodies))

    answers = asyncio.run(run())
    for body, response in zip(bodies, answers, strict=True):
        check_answer(response, body, {"gpt": "mock-gpt", "llama": "mock-llama"}[body["model"]])
    per_model = http.get("/metrics").json()["models"]
    assert per_model["gpt"]["requests"] == per_model["llama"]["requests"] == 30
    assert per_model["gpt"]["requests_by_status"] == {"200": 30}


# ----------------------------------------------------------------------------------------------- health
def test_a_backend_killed_with_requests_in_flight(models: Models, tmp_path: Path) -> None:
    """The guide's Test 3: clean errors, counted per model, nothing hangs, the other model unaffected, and the
    model healthy again once its server is back on its port."""
    port = models.gpt.port
    models.gpt.stop()
    models.gpt = PortServer(mock_app("mock-gpt", chunk_delay=0.2), port).start()
    client = models.start_proxy()
    assert models.proxy is not None
    wait_until(lambda: client.get("/health").json()["status"] == "healthy", "both models healthy", timeout=15)
    gpt_bodies = [chat(f"in flight {n}", "gpt") for n in range(8)]
    llama_bodies = [chat(f"unaffected {n}", "llama") for n in range(8)]

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=models.proxy.url, timeout=30) as http:  # type: ignore[union-attr]
            cut = [asyncio.ensure_future(http.post("/v1/chat/completions", json=body)) for body in gpt_bodies]
            stats = f"{models.gpt.url}/mock/stats"
            deadline = time.monotonic() + 10
            while (await http.get(stats)).json()["requests"].get("chat.completions", 0) < len(gpt_bodies):
                assert time.monotonic() < deadline, "the requests never reached the backend"
                await asyncio.sleep(0.02)
            await asyncio.to_thread(models.gpt.stop, 0.0)  # killed mid-answer
            others = await asyncio.gather(*(http.post("/v1/chat/completions", json=b) for b in llama_bodies))
            return await asyncio.wait_for(asyncio.gather(*cut), 20), others

    cut, others = asyncio.run(run())
    for response in cut:
        assert_openai_error(response, response.status_code)
        assert response.status_code in (502, 503)
    for body, response in zip(llama_bodies, others, strict=True):
        check_answer(response, body, "mock-llama")
    refused = client.post("/v1/chat/completions", json=chat("while it is down", "gpt"))
    assert assert_openai_error(refused, 503)["type"] == "ServiceUnavailableError"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert health.json()["models"]["gpt"]["state"] == "down" and health.json()["models"]["gpt"]["last_error"]
    assert health.json()["models"]["llama"]["state"] == "healthy"
    metrics = client.get("/metrics").json()["models"]
    assert metrics["gpt"]["upstream_errors"] >= len(gpt_bodies) and metrics["llama"]["upstream_errors"] == 0
    text = client.get("/metrics?format=prometheus").text
    assert 'llm_proxy_backend_up{model="gpt"} 0.0' in text and 'llm_proxy_backend_up{model="llama"} 1.0' in text
    assert 'llm_proxy_upstream_errors_total{model="gpt",status="502"}' in text

    models.gpt = PortServer(mock_app("mock-gpt"), port).start()  # back where the proxy expects it
    wait_until(lambda: client.get("/health").json()["models"]["gpt"]["state"] == "healthy", "gpt back", timeout=15)
    body = chat("after the restart", "gpt")
    check_answer(client.post("/v1/chat/completions", json=body), body, "mock-gpt")
    client.close()


@pytest.mark.parametrize("state", ["stopped", "restarting"])
def test_the_supervisors_state_wins_and_gives_503(models: Models, http: httpx.Client, state: str) -> None:
    cached = chat("answered before the stop", "gpt")
    assert http.post("/v1/chat/completions", json=cached).headers["x-cache"] == "MISS"
    wait_until(lambda: http.get("/metrics").json()["cache_entries"] >= 1, "answer stored")
    write_state(models.state_file, BackendState(state=state, restarts=2, last_error="exited with status 1"))
    health = http.get("/health").json()
    assert health["status"] == "degraded"
    assert health["models"]["gpt"] == {**health["models"]["gpt"], "state": state, "restarts": 2}
    assert health["models"]["gpt"]["last_error"] == "exited with status 1"
    assert {c["id"]: c["state"] for c in http.get("/v1/models").json()["data"]} == {"gpt": state, "llama": "healthy"}
    refused = http.post("/llm/gpt/chat/completions", json=chat("a new question"))
    assert state in assert_openai_error(refused, 503)["message"] and refused.headers["retry-after"]
    hit = http.post("/v1/chat/completions", json=cached)  # documented: cached answers are still served
    assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT"
    body = chat("the other model", "llama")
    check_answer(http.post("/v1/chat/completions", json=body), body, "mock-llama")
    text = http.get("/metrics?format=prometheus").text
    assert 'llm_proxy_backend_restarts{model="gpt"} 2.0' in text
    assert f'llm_proxy_backend_state{{model="gpt",state="{state}"}} 1.0' in text
    write_state(models.state_file, BackendState(state="starting"))
    wait_until(lambda: http.get("/health").json()["status"] == "healthy", "healthy once it answers again")


# ----------------------------------------------------------------------------------------------- metrics
def test_per_model_prometheus_and_json_metrics(models: Models, http: httpx.Client) -> None:
    """The guide's Test 2: ten concurrent requests on one model, counted under it (and only configured ids)."""
    assert models.proxy is not None

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=models.proxy.url, timeout=30) as client:  # type: ignore[union-attr]
            bodies = [chat(f"Request {n}") for n in range(10)]
            await asyncio.gather(*(client.post("/llm/gpt/chat/completions", json=body) for body in bodies))

    asyncio.run(burst())
    http.post("/llm/gpt/chat/completions", json=chat("Request 0"))  # a hit
    http.post("/v1/chat/completions", json=chat("hi", "not-configured"))
    text = http.get("/metrics", headers={"Accept": "text/plain"}).text
    assert 'llm_proxy_requests_total{cache="MISS",model="gpt",status="200"} 10.0' in text
    assert 'llm_proxy_requests_total{cache="HIT",model="gpt",status="200"} 1.0' in text
    assert 'llm_proxy_request_duration_seconds_count{cache="MISS",model="gpt"} 10.0' in text
    assert "not-configured" not in text  # the label holds configured ids only
    per_model = http.get("/metrics").json()["models"]
    gpt: dict[str, Any] = per_model["gpt"]
    assert gpt["requests"] == 11 and gpt["requests_by_cache"] == {"MISS": 10, "HIT": 1}
    assert gpt["upstream_calls"] == 10 and gpt["upstream_errors"] == 0 and gpt["state"] == "healthy"
    assert per_model["llama"]["requests"] == 0
    assert json.loads(json.dumps(per_model)) == per_model


def test_each_model_has_its_own_idleness_clock(models: Models, http: httpx.Client) -> None:
    """A RunPod model among several is stopped when *it* is idle: its own in-flight count and last 2xx, not the
    proxy's (a busy autocomplete model must not keep an idle chat pod billing)."""
    per_model = http.get("/metrics").json()["models"]
    assert per_model["gpt"]["in_flight"] == 0 and per_model["gpt"]["last_request_at"] is None
    before = time.time()
    httpx.post(f"{models.gpt.url}/mock/config", json={"chunk_delay": 0.2}, timeout=5).raise_for_status()
    with http.stream("POST", "/v1/chat/completions", json={**chat("slow one", "gpt"), "stream": True}) as stream:
        lines = stream.iter_lines()  # kept: a generator dropped would close the stream
        next(lines)  # the first event: the request is in flight
        during = http.get("/metrics").json()["models"]
        assert during["gpt"]["in_flight"] == 1 and during["llama"]["in_flight"] == 0
        assert during["gpt"]["last_request_at"] is None  # not done yet
        assert list(lines)[-2:] == ["data: [DONE]", ""]
    assert http.post("/v1/chat/completions", json=chat("fails", "llama") | {"max_tokens": -1}).status_code == 400
    after = http.get("/metrics").json()["models"]
    assert after["gpt"]["in_flight"] == after["llama"]["in_flight"] == 0
    assert after["gpt"]["last_request_at"] >= before
    assert after["llama"]["last_request_at"] is None  # a 400 is no activity


def test_a_replaced_pod_is_followed_without_a_restart(models: Models, http: httpx.Client) -> None:
    """A RunPod model's pod replaced: the supervisor's state file names the new pod's URL and vLLM key, and the
    running proxy sends that model's requests there (with the new key), the other model untouched."""
    assert http.post("/v1/chat/completions", json=chat("before", "gpt")).status_code == 200
    replacement = LoopbackServer(mock_app("mock-gpt", api_key="new-pod-key-0123456789")).start()
    try:
        write_state(
            models.state_file,
            BackendState(state="healthy", base_url=f"{replacement.url}/v1/", api_key="new-pod-key-0123456789"),
        )
        assert "new-pod-key" not in models.state_file.read_text().replace("new-pod-key-0123456789", "")
        answer = http.post("/v1/chat/completions", json=chat("after", "gpt"))
        assert answer.status_code == 200, answer.text
        assert sum(httpx.get(f"{replacement.url}/mock/stats", timeout=5).json()["requests"].values()) >= 1
        assert http.get("/metrics").json()["models"]["gpt"]["url"] == f"{replacement.url}/v1"
        assert http.post("/v1/chat/completions", json=chat("other", "llama")).status_code == 200
        assert "new-pod-key" not in http.get("/health").text + http.get("/metrics").text
    finally:
        replacement.stop()
