"""The proxy's upstream client against respx fakes of vLLM's routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmpod.config import ProxySettings
from llmpod.errors import UpstreamError
from llmpod.upstream import (
    ServedModel,
    Upstream,
    cap_max_tokens,
    context_limit_from_error,
    match_model,
    stream_pool,
)
from tests.servers import LoopbackServer, free_port

BASE = "http://vllm.test:8000"
SERVED = "TheBloke/deepseek-coder-33B-instruct-AWQ"


def models_body(*ids: str, max_model_len: int = 16384) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": i, "object": "model", "created": 1, "owned_by": "vllm", "root": i, "parent": None,
         "max_model_len": max_model_len, "permission": []} for i in ids]}


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    settings = ProxySettings(upstream_url=f"{BASE}/v1/chat/completions", upstream_api_key="upstream-secret",
                             upstream_timeout=5)
    async with httpx.AsyncClient() as client:
        yield Upstream(settings, client)


@pytest.fixture
def mocked_vllm() -> respx.MockRouter:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


def test_match_model_accepts_full_id_basename_case_and_unique_parts() -> None:
    served = [ServedModel(SERVED, 16384), ServedModel("Qwen/Qwen2.5-Coder-7B-Instruct", 32768)]
    assert match_model(SERVED, served) is served[0]
    assert match_model(SERVED.lower(), served) is served[0]
    assert match_model("deepseek-coder-33B-instruct-AWQ", served) is served[0]
    assert match_model("DEEPSEEK-CODER-33B-INSTRUCT-AWQ", served) is served[0]
    assert match_model("deepseek-coder-33b-awq", served) is served[0]  # the short name users configure
    assert match_model("qwen2.5-coder-7b-instruct", served) is served[1]
    assert match_model("llama-3-70b", served) is None
    ambiguous = [ServedModel("a/coder-7b", None), ServedModel("b/coder-7b-instruct", None)]
    assert match_model("coder", ambiguous) is None


def test_context_limit_parsed_from_current_and_older_vllm_messages() -> None:
    current = ("'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context "
               "length is 16384 tokens and your request has 120 input tokens (32000 > 16384 - 120).")
    older = ("This model's maximum context length is 2048 tokens. However, you requested 3000 tokens "
             "(1000 in the messages, 2000 in the completion). Please reduce the length of the messages.")
    assert context_limit_from_error(current) == (16384, 120)
    assert context_limit_from_error(older) == (2048, 1000)
    assert context_limit_from_error("The model `x` does not exist.") is None


def test_cap_max_tokens_only_lowers() -> None:
    body = {"max_tokens": 32000, "max_completion_tokens": 100, "messages": []}
    assert cap_max_tokens(body, 1000) == {"max_tokens": 1000, "max_completion_tokens": 100, "messages": []}
    assert cap_max_tokens({"max_tokens": 10}, 1000) is None
    assert cap_max_tokens({"max_tokens": 32000}, 0) is None  # prompt alone too long: vLLM must say so


async def test_resolve_rewrites_alias_and_404_lists_served_ids(upstream: Upstream,
                                                               mocked_vllm: respx.MockRouter) -> None:
    route = mocked_vllm.get("/v1/models").respond(json=models_body(SERVED))
    assert (await upstream.resolve("deepseek-coder-33b-awq")).id == SERVED
    assert (await upstream.resolve(None)).id == SERVED  # vLLM uses its only model when none is named
    with pytest.raises(UpstreamError) as caught:
        await upstream.resolve("gpt-4o")
    assert caught.value.status == 404
    assert caught.value.body["error"]["type"] == "NotFoundError"
    assert caught.value.body["error"]["param"] == "model"
    assert SERVED in caught.value.body["error"]["message"]
    assert route.calls[0].request.headers["authorization"] == "Bearer upstream-secret"


async def test_resolve_forwards_as_is_when_models_unknown(upstream: Upstream,
                                                          mocked_vllm: respx.MockRouter) -> None:
    mocked_vllm.get("/v1/models").mock(side_effect=httpx.ConnectError("refused"))
    assert await upstream.resolve("anything") is None


async def test_an_expired_model_list_is_fetched_once_for_all_waiting_requests(
        upstream: Upstream, mocked_vllm: respx.MockRouter) -> None:
    asked, release = asyncio.Event(), asyncio.Event()

    async def slow_list(request: httpx.Request) -> httpx.Response:
        asked.set()
        await release.wait()
        return httpx.Response(200, json=models_body(SERVED))

    route = mocked_vllm.get("/v1/models").mock(side_effect=slow_list)
    waiting = [asyncio.ensure_future(upstream.resolve("deepseek-coder-33b-awq")) for _ in range(50)]
    await asyncio.wait_for(asked.wait(), 5)  # the one fetch is out, and everyone is waiting for it
    waiting[0].cancel()  # one client hanging up does not cancel the list the others wait for
    release.set()
    resolved = await asyncio.gather(*waiting[1:])
    assert {m.id for m in resolved} == {SERVED}
    assert route.call_count == 1


async def test_fit_context_uses_tokenize_once_per_distinct_request(upstream: Upstream,
                                                                   mocked_vllm: respx.MockRouter) -> None:
    tokenize = mocked_vllm.post("/tokenize").respond(json={"count": 384, "max_model_len": 16384,
                                                           "tokens": [], "token_strs": None})
    model = ServedModel(SERVED, 16384)
    body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32000}
    fitted = await upstream.fit_context("chat.completions", body, model, lambda: "digest-1", len(json.dumps(body)))
    assert fitted["max_tokens"] == 16384 - 384
    assert body["max_tokens"] == 32000  # the caller's dict is not changed
    again = await upstream.fit_context("chat.completions", body, model, lambda: "digest-1", len(json.dumps(body)))
    assert again["max_tokens"] == 16384 - 384
    assert tokenize.call_count == 1
    sent = json.loads(tokenize.calls[0].request.content)
    assert sent["messages"] == body["messages"]
    assert "/v1/" not in str(tokenize.calls[0].request.url)  # vLLM serves /tokenize at the root


async def test_fit_context_skips_tokenize_when_it_surely_fits(upstream: Upstream,
                                                              mocked_vllm: respx.MockRouter) -> None:
    tokenize = mocked_vllm.post("/tokenize").respond(json={"count": 5})
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    model = ServedModel(SERVED, 16384)
    assert await upstream.fit_context("chat.completions", body, model, lambda: "d", len(json.dumps(body))) is body
    assert tokenize.call_count == 0


async def test_fit_context_leaves_body_when_tokenize_fails(upstream: Upstream,
                                                           mocked_vllm: respx.MockRouter) -> None:
    mocked_vllm.post("/tokenize").respond(404, json={"detail": "Not Found"})
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32000}
    model = ServedModel(SERVED, 4096)
    assert await upstream.fit_context("chat.completions", body, model, lambda: "d", len(json.dumps(body))) is body


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


class ScriptedVllm:
    """A stand-in for vLLM's generation route on a real loopback socket: answers with queued responses
    (the streaming hop uses our own HTTP/1.1 pool, which respx cannot fake) and records the bodies it received."""

    def __init__(self) -> None:
        self.answers: list[Response] = []
        self.bodies: list[dict[str, Any]] = []
        self.headers: dict[str, str] = {}

    def app(self) -> Starlette:
        async def generate(request: Request) -> Response:
            self.bodies.append(json.loads(await request.body()))
            self.headers = dict(request.headers)
            return self.answers.pop(0)

        return Starlette(routes=[Route("/v1/chat/completions", generate, methods=["POST"])])


@pytest.fixture
def scripted_vllm() -> Iterator[tuple[ScriptedVllm, str]]:
    script = ScriptedVllm()
    with LoopbackServer(script.app()) as server:
        yield script, server.url


@pytest.fixture
async def stream_upstream(scripted_vllm: tuple[ScriptedVllm, str]) -> AsyncIterator[Upstream]:
    yield await _upstream(f"{scripted_vllm[1]}/v1")


async def _upstream(url: str, timeout: float = 5) -> Upstream:
    settings = ProxySettings(upstream_url=url, upstream_api_key="upstream-secret", upstream_timeout=timeout)
    return Upstream(settings, httpx.AsyncClient(), stream_pool(settings))


async def _close(upstream: Upstream) -> None:
    assert upstream.pool is not None
    await upstream.pool.aclose()
    await upstream.client.aclose()


def problem(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(payload, status_code=status, headers=headers)


async def test_open_stream_retries_once_with_the_limit_a_context_400_names(
        scripted_vllm: tuple[ScriptedVllm, str], stream_upstream: Upstream) -> None:
    script, _ = scripted_vllm
    message = ("'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context "
               "length is 4096 tokens and your request has 96 input tokens (32000 > 4096 - 96).")
    script.answers = [
        problem(400, {"error": {"message": message, "type": "BadRequestError", "param": "max_tokens", "code": 400}}),
        Response(sse({"choices": []}), media_type="text/event-stream"),
    ]
    response = await stream_upstream.open_stream("/chat/completions", {"model": "m", "max_tokens": 32000})
    assert response.status == 200
    response.release()
    await _close(stream_upstream)
    assert [b["max_tokens"] for b in script.bodies] == [32000, 4000]
    assert script.headers["authorization"] == "Bearer upstream-secret"


@pytest.mark.parametrize(("status", "payload", "expected_type"), [
    (500, {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}},
     "InternalServerError"),
    (400, {"object": "error", "message": "bad", "type": "BadRequestError", "param": "temperature", "code": 400},
     "BadRequestError"),  # vLLM < 0.10.1 flat shape
    (503, {"detail": "Service Unavailable"}, "InternalServerError"),
])
async def test_open_stream_passes_upstream_errors_through_in_openai_shape(
        scripted_vllm: tuple[ScriptedVllm, str], stream_upstream: Upstream, status: int, payload: dict[str, Any],
        expected_type: str) -> None:
    scripted_vllm[0].answers = [problem(status, payload)]
    with pytest.raises(UpstreamError) as caught:
        await stream_upstream.open_stream("/chat/completions", {"model": "m"})
    await _close(stream_upstream)
    error = caught.value.body["error"]
    assert caught.value.status == status
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == expected_type
    assert error["message"] in ("boom", "bad", "Service Unavailable")


async def test_rate_limit_keeps_retry_after(scripted_vllm: tuple[ScriptedVllm, str],
                                            stream_upstream: Upstream) -> None:
    scripted_vllm[0].answers = [problem(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})]
    with pytest.raises(UpstreamError) as caught:
        await stream_upstream.open_stream("/chat/completions", {})
    await _close(stream_upstream)
    assert caught.value.status == 429
    assert caught.value.headers == {"retry-after": "7"}


async def test_upstream_auth_failure_points_at_the_proxy_key_without_showing_it(
        scripted_vllm: tuple[ScriptedVllm, str], stream_upstream: Upstream) -> None:
    scripted_vllm[0].answers = [problem(401, {"error": "Unauthorized"})]
    with pytest.raises(UpstreamError) as caught:
        await stream_upstream.open_stream("/chat/completions", {})
    await _close(stream_upstream)
    assert caught.value.status == 401
    assert "UPSTREAM_API_KEY" in caught.value.body["error"]["message"]
    assert "upstream-secret" not in json.dumps(caught.value.body)


async def test_unreachable_upstream_is_502_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    upstream = await _upstream(url)
    with pytest.raises(UpstreamError) as caught:
        await upstream.open_stream("/chat/completions", {})
    await _close(upstream)
    assert caught.value.status == 502
    assert "unreachable" in caught.value.body["error"]["message"] and url in caught.value.body["error"]["message"]


async def test_silent_upstream_is_504_naming_it(silent_upstream: str) -> None:
    upstream = await _upstream(silent_upstream, timeout=0.3)
    with pytest.raises(UpstreamError) as caught:
        await upstream.open_stream("/chat/completions", {})
    await _close(upstream)
    assert caught.value.status == 504
    assert "did not answer within 0.3s" in caught.value.body["error"]["message"]


async def test_probe_reports_health_and_models(upstream: Upstream, mocked_vllm: respx.MockRouter) -> None:
    mocked_vllm.get("/health").respond(200)
    mocked_vllm.get("/v1/models").respond(json=models_body(SERVED))
    report = await upstream.probe()
    assert report["reachable"] is True
    assert report["status_code"] == 200
    assert report["models"] == [SERVED]


async def test_probe_reports_refused_connection(upstream: Upstream, mocked_vllm: respx.MockRouter) -> None:
    mocked_vllm.get("/health").mock(side_effect=httpx.ConnectError("Connection refused"))
    report = await upstream.probe()
    assert report["reachable"] is False
    assert "unreachable" in report["error"]
