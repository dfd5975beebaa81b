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

from llmpod.errors import UpstreamError
from llmpod.proxy import ProxySettings
from llmpod.proxy.upstream import ServedModel, Upstream, match_model, stream_pool
from tests.proxy.test_context_fit import (
    PRE_RENDERER,
    V0271_AT_LEAST,
    V0271_MAX_TOKENS,
    V0271_TOTAL,
    V0330_MAX_TOKENS,
    V0330_PROMPT_ALONE,
)
from tests.support.servers import LoopbackServer, free_port

BASE = "http://vllm.test:8000"
SERVED = "TheBloke/deepseek-coder-33B-instruct-AWQ"


def models_body(*ids: str, max_model_len: int = 16384) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": i,
                "object": "model",
                "created": 1,
                "owned_by": "vllm",
                "root": i,
                "parent": None,
                "max_model_len": max_model_len,
                "permission": [],
            }
            for i in ids
        ],
    }


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    settings = ProxySettings(
        upstream_url=f"{BASE}/v1/chat/completions", upstream_api_key="upstream-secret", upstream_timeout=5
    )
    async with httpx.AsyncClient() as client:
        yield Upstream(settings, client)


@pytest.fixture
def mocked_vllm() -> respx.MockRouter:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        router.get("/version").respond(404, json={"detail": "Not Found"})  # tests that need one set their own
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


async def test_resolve_rewrites_alias_and_404_lists_served_ids(
    upstream: Upstream, mocked_vllm: respx.MockRouter
) -> None:
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


async def test_resolve_forwards_as_is_when_models_unknown(upstream: Upstream, mocked_vllm: respx.MockRouter) -> None:
    mocked_vllm.get("/v1/models").mock(side_effect=httpx.ConnectError("refused"))
    assert await upstream.resolve("anything") is None


async def test_an_expired_model_list_is_fetched_once_for_all_waiting_requests(
    upstream: Upstream, mocked_vllm: respx.MockRouter
) -> None:
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


KILO_TURN = {"model": SERVED, "messages": [{"role": "user", "content": "hi " * 8000}], "max_tokens": 32000}


async def test_the_version_is_asked_once_and_a_vllm_that_lowers_max_tokens_gets_no_count(
    upstream: Upstream, mocked_vllm: respx.MockRouter
) -> None:
    version = mocked_vllm.get("/version").respond(json={"version": "0.33.0"})
    mocked_vllm.get("/v1/models").respond(json=models_body(SERVED))
    tokenize = mocked_vllm.post("/tokenize").respond(json={"count": 5})
    model = await upstream.resolve(SERVED)
    await upstream.models(refresh=True)
    for _ in range(3):
        fitted = await upstream.fit_context(KILO_TURN, model, len(json.dumps(KILO_TURN)))
        assert fitted["max_tokens"] == 16384  # vLLM 0.33 lowers it further itself
    assert upstream.lowers_itself and upstream.version == "0.33.0"
    assert version.call_count == 1
    assert tokenize.call_count == 0
    assert "/v1/" not in str(version.calls[0].request.url)  # vLLM serves /version at the root


@pytest.mark.parametrize(
    "answer",
    [
        {"status_code": 404, "json": {"detail": "Not Found"}},  # not vLLM, or too old to say
        {"status_code": 200, "json": {"version": "0.27.1"}},
        {"status_code": 200, "json": ["not", "an", "object"]},
    ],
)
async def test_an_upstream_that_does_not_say_it_lowers_max_tokens_is_counted(
    upstream: Upstream, mocked_vllm: respx.MockRouter, answer: dict[str, Any]
) -> None:
    version = mocked_vllm.get("/version").respond(**answer)
    mocked_vllm.get("/v1/models").respond(json=models_body(SERVED))
    tokenize = mocked_vllm.post("/tokenize").respond(
        json={"count": 384, "max_model_len": 16384, "tokens": [], "token_strs": None}
    )
    model = await upstream.resolve(SERVED)
    fitted = await upstream.fit_context(KILO_TURN, model, len(json.dumps(KILO_TURN)))
    assert fitted["max_tokens"] == 16384 - 384
    assert KILO_TURN["max_tokens"] == 32000  # the caller's dict is not changed
    assert not upstream.lowers_itself
    assert tokenize.call_count == 1
    sent = json.loads(tokenize.calls[0].request.content)
    assert sent["messages"] == KILO_TURN["messages"]
    assert "/v1/" not in str(tokenize.calls[0].request.url)  # vLLM serves /tokenize at the root
    await upstream.models(refresh=True)
    assert version.call_count == 1  # an answer, whatever it says, is final


@pytest.mark.parametrize(
    "first",
    [
        httpx.ConnectError("refused"),
        httpx.Response(502, content=b"<html>Bad Gateway</html>"),  # RunPod's edge while the pod restarts
        httpx.Response(200, content=b"<html>"),  # a captive page or proxy, not vLLM's JSON
        httpx.Response(401, json={"error": "Unauthorized"}),
    ],
)
async def test_a_version_not_answered_is_asked_again_with_the_next_model_list(
    upstream: Upstream, mocked_vllm: respx.MockRouter, first: Exception | httpx.Response
) -> None:
    # a 0.33 pod taken for an old server would pay a /tokenize round trip per session until the proxy restarts
    version = mocked_vllm.get("/version").mock(side_effect=[first, httpx.Response(200, json={"version": "0.34.0"})])
    mocked_vllm.get("/v1/models").respond(json=models_body(SERVED))
    await upstream.models()
    assert not upstream.lowers_itself
    upstream._models_at = 0.0  # the list expired
    await upstream.models()
    assert upstream.lowers_itself
    assert version.call_count == 2
    assert version.calls[0].request.headers["authorization"] == "Bearer upstream-secret"


async def test_tokenize_gets_what_the_chat_template_renders(upstream: Upstream, mocked_vllm: respx.MockRouter) -> None:
    # a thinking switch or a template of the request's own changes the prompt's count (vLLM 0.33's
    # TokenizeChatRequest takes these fields); the sampling fields do not belong there
    tokenize = mocked_vllm.post("/tokenize").respond(json={"count": 384})
    body = {
        **KILO_TURN,
        "tools": [{"type": "function", "function": {"name": "read"}}],
        "chat_template_kwargs": {"enable_thinking": False},
        "add_generation_prompt": True,
        "temperature": 0.2,
    }
    assert await upstream.count_tokens(body) == 384
    sent = json.loads(tokenize.calls[0].request.content)
    assert sent == {
        "model": SERVED,
        "messages": body["messages"],
        "tools": body["tools"],
        "chat_template_kwargs": {"enable_thinking": False},
        "add_generation_prompt": True,
    }


async def test_fit_context_leaves_body_when_tokenize_fails(upstream: Upstream, mocked_vllm: respx.MockRouter) -> None:
    mocked_vllm.post("/tokenize").respond(404, json={"detail": "Not Found"})
    body = {"messages": [{"role": "user", "content": "hi " * 2000}], "max_tokens": 32000}
    model = ServedModel(SERVED, 4096)
    assert await upstream.fit_context(body, model, len(json.dumps(body))) is body


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


class ScriptedVllm:
    """A stand-in for vLLM's generation route on a real loopback socket: answers with queued responses
    (the streaming hop uses our own HTTP/1.1 pool, which respx cannot fake) and records the bodies it received."""

    def __init__(self) -> None:
        self.answers: list[Response] = []
        self.bodies: list[dict[str, Any]] = []
        self.headers: dict[str, str] = {}
        self.prompt_tokens = 1000  # what its /tokenize counts
        self.counted = 0

    def app(self) -> Starlette:
        async def generate(request: Request) -> Response:
            self.bodies.append(json.loads(await request.body()))
            self.headers = dict(request.headers)
            return self.answers.pop(0)

        async def tokenize(request: Request) -> Response:
            self.counted += 1
            return JSONResponse({"count": self.prompt_tokens})

        return Starlette(
            routes=[
                Route("/v1/chat/completions", generate, methods=["POST"]),
                Route("/tokenize", tokenize, methods=["POST"]),
            ]
        )


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


# the exact wordings: tests/proxy/test_context_fit.py says which vLLM release says each
@pytest.mark.parametrize(
    ("message", "lowers_itself", "retried_with", "counted"),
    [
        (V0271_TOTAL, False, 16384 - 12000, 0),  # the count is in the message
        (PRE_RENDERER, False, 16384 - 120, 0),
        (V0271_AT_LEAST, False, 16384 - 1000, 1),  # "at least": /tokenize says how many
        (V0271_MAX_TOKENS, False, 16384 - 1000, 1),  # the context alone: the prompt must be counted
        (V0330_MAX_TOKENS, True, 16384, 0),  # 0.32+ lowers the rest itself
    ],
)
async def test_open_stream_retries_once_with_what_a_context_400_says_fits(
    scripted_vllm: tuple[ScriptedVllm, str],
    stream_upstream: Upstream,
    message: str,
    lowers_itself: bool,
    retried_with: int,
    counted: int,
) -> None:
    script, _ = scripted_vllm
    stream_upstream.lowers_itself = lowers_itself
    script.answers = [
        problem(400, {"error": {"message": message, "type": "BadRequestError", "param": "max_tokens", "code": 400}}),
        Response(sse({"choices": []}), media_type="text/event-stream"),
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32000}
    response = await stream_upstream.open_stream("/chat/completions", body)
    assert response.status == 200
    response.release()
    await _close(stream_upstream)
    assert [b["max_tokens"] for b in script.bodies] == [32000, retried_with]
    assert script.counted == counted
    assert script.headers["authorization"] == "Bearer upstream-secret"


async def test_a_prompt_too_long_for_any_answer_is_refused_without_a_retry(
    scripted_vllm: tuple[ScriptedVllm, str], stream_upstream: Upstream
) -> None:
    script, _ = scripted_vllm
    stream_upstream.lowers_itself = True
    script.answers = [
        problem(
            400,
            {"error": {"message": V0330_PROMPT_ALONE, "type": "BadRequestError", "param": "input_tokens", "code": 400}},
        )
    ]
    with pytest.raises(UpstreamError) as caught:
        await stream_upstream.open_stream("/chat/completions", {"model": "m", "max_tokens": 100, "messages": []})
    await _close(stream_upstream)
    assert caught.value.status == 400
    assert caught.value.body["error"]["message"] == V0330_PROMPT_ALONE
    assert len(script.bodies) == 1


@pytest.mark.parametrize(
    ("status", "payload", "expected_type"),
    [
        (
            500,
            {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}},
            "InternalServerError",
        ),
        (
            400,
            {"object": "error", "message": "bad", "type": "BadRequestError", "param": "temperature", "code": 400},
            "BadRequestError",
        ),  # vLLM < 0.10.1 flat shape
        (503, {"detail": "Service Unavailable"}, "InternalServerError"),
    ],
)
async def test_open_stream_passes_upstream_errors_through_in_openai_shape(
    scripted_vllm: tuple[ScriptedVllm, str],
    stream_upstream: Upstream,
    status: int,
    payload: dict[str, Any],
    expected_type: str,
) -> None:
    scripted_vllm[0].answers = [problem(status, payload)]
    with pytest.raises(UpstreamError) as caught:
        await stream_upstream.open_stream("/chat/completions", {"model": "m"})
    await _close(stream_upstream)
    error = caught.value.body["error"]
    assert caught.value.status == status
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == expected_type
    assert error["message"] in ("boom", "bad", "Service Unavailable")


async def test_rate_limit_keeps_retry_after(scripted_vllm: tuple[ScriptedVllm, str], stream_upstream: Upstream) -> None:
    scripted_vllm[0].answers = [problem(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})]
    with pytest.raises(UpstreamError) as caught:
        await stream_upstream.open_stream("/chat/completions", {})
    await _close(stream_upstream)
    assert caught.value.status == 429
    assert caught.value.headers == {"retry-after": "7"}


async def test_upstream_auth_failure_points_at_the_proxy_key_without_showing_it(
    scripted_vllm: tuple[ScriptedVllm, str], stream_upstream: Upstream
) -> None:
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
