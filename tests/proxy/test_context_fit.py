"""Fitting max_tokens to the context as each vLLM release needs: version parsing, the wordings of vLLM's 400s
(quoted from the wheels' vllm/renderers/params.py and vllm/exceptions.py, and from vLLM 0.33.0's own server), the
prompt bound learned from earlier turns, and the decision of when to ask /tokenize."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmpod.proxy import ProxySettings, create_app
from llmpod.proxy.context_fit import (
    TOKEN_MARGIN,
    PromptMemory,
    cap_max_tokens,
    fit,
    lowers_max_tokens_itself,
    parse_version,
    refusal_from_error,
)
from tests.support.helpers import wait_for_stored
from tests.support.servers import LoopbackServer


@pytest.mark.parametrize(
    ("text", "parsed", "lowers"),
    [
        ("0.27.1", (0, 27, 1), False),
        ("0.31.0", (0, 31, 0), False),  # still refuses prompt + max_tokens over the context
        ("0.32.0", (0, 32, 0), True),  # the first release that lowers max_tokens itself
        ("0.33.0", (0, 33, 0), True),
        ("0.34.0+cu128", (0, 34, 0), True),
        ("0.32.1rc2.dev14+g1a2b3c", (0, 32, 1), True),
        ("v1.0", (1, 0, 0), True),
        ("", None, False),
        ("unknown", None, False),
        (None, None, False),
        (33, None, False),
    ],
)
def test_version_decides_whether_the_server_lowers_max_tokens(text: Any, parsed: Any, lowers: bool) -> None:
    assert parse_version(text) == parsed
    assert lowers_max_tokens_itself(parsed) is lowers


# vLLM 0.33.0's own server (serve_stub.py), max_model_len 16384: the exact 400 messages
V0330_MAX_TOKENS = (
    "max_tokens=32000 cannot be greater than max_model_len=16384. Please request fewer output "
    "tokens. (parameter=max_tokens, value=32000)"
)
V0330_MAX_COMPLETION_TOKENS = (
    "max_completion_tokens=32000 cannot be greater than max_model_len=16384. Please "
    "request fewer output tokens. (parameter=max_completion_tokens, value=32000)"
)
V0330_PROMPT_ALONE = (
    "This model's maximum context length is 16384 tokens. However, your prompt contains at least "
    "16385 input tokens, which exceeds this limit even without any output tokens. Please reduce "
    "the length of the input prompt. (parameter=input_tokens, value=16385)"
)
# vLLM 0.27.1 (also 0.28.0-0.30.0 for the first; 0.31.0 prints "max_model_len=16384" there), rendered from the
# f-strings of vllm/renderers/params.py with VLLMValidationError's "(parameter=..., value=...)" (vllm/exceptions.py)
V0271_MAX_TOKENS = (
    "max_tokens=32000 cannot be greater than max_model_len=max_total_tokens=16384. Please request "
    "fewer output tokens. (parameter=max_tokens, value=32000)"
)
V0271_TOTAL = (
    "This model's maximum context length is 16384 tokens. However, you requested 8000 output tokens and "
    "your prompt contains 12000 input tokens, for a total of 20000 tokens. Please reduce the length of "
    "the input prompt or the number of requested output tokens. (parameter=input_tokens, value=12000)"
)
V0271_AT_LEAST = (
    "This model's maximum context length is 16384 tokens. However, you requested 16000 output tokens "
    "and your prompt contains at least 385 input tokens, for a total of at least 16385 tokens. Please "
    "reduce the length of the input prompt or the number of requested output tokens. "
    "(parameter=input_tokens, value=385)"
)
V0271_CHARACTERS = (
    "This model's maximum context length is 16384 tokens. However, you requested 16000 output tokens "
    "and your prompt contains 52873 characters (more than 6144 characters, which is the upper bound "
    "for 384 input tokens). Please reduce the length of the input prompt or the number of requested "
    "output tokens. (parameter=input_text, value=52873)"
)
# before the renderers (as users quote it from older releases; not checked against a wheel here)
PRE_RENDERER = (
    "'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context length "
    "is 16384 tokens and your request has 120 input tokens (32000 > 16384 - 120)."
)


@pytest.mark.parametrize(
    ("message", "refusal"),
    [
        (V0330_MAX_TOKENS, (16384, None)),
        (V0330_MAX_COMPLETION_TOKENS, (16384, None)),
        (V0330_PROMPT_ALONE, (16384, None)),  # "at least": no count, and nothing fits anyway
        (V0271_MAX_TOKENS, (16384, None)),
        (V0271_TOTAL, (16384, 12000)),
        (V0271_AT_LEAST, (16384, None)),  # the prompt was cut at the limit: its real count is unknown
        (V0271_CHARACTERS, (16384, None)),
        (PRE_RENDERER, (16384, 120)),
        ("The model `x` does not exist. Valid aliases: my-model.", None),
        ('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set', None),
    ],
)
def test_vllm_context_refusals_are_read_per_release(message: str, refusal: Any) -> None:
    assert refusal_from_error(message) == refusal


def test_cap_max_tokens_only_lowers() -> None:
    body = {"max_tokens": 32000, "max_completion_tokens": 100, "messages": []}
    assert cap_max_tokens(body, 1000) == {"max_tokens": 1000, "max_completion_tokens": 100, "messages": []}
    assert cap_max_tokens({"max_tokens": 10}, 1000) is None
    assert cap_max_tokens({"max_tokens": 32000}, 0) is None  # prompt alone too long: vLLM must say so


def turn(messages: list[dict[str, Any]], max_tokens: int = 32000) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": messages,
        "tools": [{"type": "function", "function": {"name": "read_file"}}],
        "max_tokens": max_tokens,
        "stream": True,
    }


SYSTEM = {"role": "system", "content": "You are Kilo Code. " * 2000}
FIRST = [SYSTEM, {"role": "user", "content": "<task>add a flag</task>"}]
SECOND = [
    *FIRST,
    {"role": "assistant", "content": "reading"},
    {"role": "tool", "tool_call_id": "c", "content": "x = 1"},
    {"role": "user", "content": "<environment_details>12:01</environment_details>"},
]


def size(body: dict[str, Any]) -> int:
    return len(orjson.dumps(body))


def test_a_remembered_prefix_bounds_the_next_turn_by_its_count_plus_the_added_bytes() -> None:
    memory = PromptMemory()
    first, second = turn(FIRST), turn(SECOND)
    assert memory.bound(second, size(second)) == (size(second) + TOKEN_MARGIN, 0)  # nothing known: bytes
    memory.learn(first, 9000)
    added = sum(len(orjson.dumps(m)) for m in SECOND[len(FIRST) :])
    assert memory.bound(second, size(second)) == (9000 + added + TOKEN_MARGIN, 9000)
    assert memory.bound(first, size(first)) == (9000, 9000)  # the same prompt again: its exact count
    other_tools = {**second, "tools": []}  # the template renders the tools: another prompt
    assert memory.bound(other_tools, size(other_tools))[1] == 0


class CountingTokenizer:
    """Fakes vLLM's /tokenize: counts a token per 4 bytes of the messages, and how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, body: dict[str, Any]) -> int | None:
        self.calls += 1
        return len(orjson.dumps(body["messages"])) // 4


async def test_a_server_that_lowers_max_tokens_itself_gets_a_cap_at_the_context_and_no_count() -> None:
    tokenizer = CountingTokenizer()
    body = turn(FIRST)
    fitted = await fit(body, size(body), 16384, True, PromptMemory(), tokenizer)
    assert fitted["max_tokens"] == 16384
    assert body["max_tokens"] == 32000  # the caller's dict is not changed
    small = turn(FIRST, max_tokens=500)
    assert await fit(small, size(small), 16384, True, PromptMemory(), tokenizer) is small
    assert tokenizer.calls == 0


async def test_an_older_server_is_counted_on_the_first_turn_only() -> None:
    tokenizer, memory = CountingTokenizer(), PromptMemory()
    first, second = turn(FIRST), turn(SECOND)
    fitted = await fit(first, size(first), 32768, False, memory, tokenizer)
    assert tokenizer.calls == 1
    assert fitted["max_tokens"] == 32768 - len(orjson.dumps(FIRST)) // 4  # vLLM's count: all the room there is
    memory.learn(first, len(orjson.dumps(FIRST)) // 4)  # the answer's usage.prompt_tokens
    fitted = await fit(second, size(second), 32768, False, memory, tokenizer)
    assert tokenizer.calls == 1  # the second turn is bounded by the first's count
    added = sum(len(orjson.dumps(m)) for m in SECOND[len(FIRST) :])
    assert fitted["max_tokens"] == 32768 - (len(orjson.dumps(FIRST)) // 4 + added + TOKEN_MARGIN)


async def test_an_older_server_is_not_asked_when_the_request_surely_fits() -> None:
    tokenizer = CountingTokenizer()
    body = turn([{"role": "user", "content": "hi"}], max_tokens=100)
    assert await fit(body, size(body), 16384, False, PromptMemory(), tokenizer) is body
    assert tokenizer.calls == 0


async def test_an_older_server_is_asked_again_when_the_bound_would_leave_the_answer_too_little_room() -> None:
    tokenizer, memory = CountingTokenizer(), PromptMemory()
    first = turn(FIRST)
    memory.learn(first, 9000)
    # 12 KB added since: a token per byte would leave 16384 - 9000 - 12000 - margin, too little
    long_turn = turn([*FIRST, {"role": "tool", "tool_call_id": "c", "content": "y" * 12000}])
    fitted = await fit(long_turn, size(long_turn), 16384, False, memory, tokenizer)
    assert tokenizer.calls == 1
    assert fitted["max_tokens"] == 16384 - len(orjson.dumps(long_turn["messages"])) // 4


async def test_a_failed_count_forwards_the_body_unchanged() -> None:
    async def unavailable(body: dict[str, Any]) -> int | None:
        return None

    body = turn(FIRST)
    assert await fit(body, size(body), 16384, False, PromptMemory(), unavailable) is body


async def test_unknown_context_or_no_max_tokens_changes_nothing() -> None:
    tokenizer = CountingTokenizer()
    body = turn(FIRST)
    assert await fit(body, size(body), None, False, PromptMemory(), tokenizer) is body
    no_max = {k: v for k, v in body.items() if k != "max_tokens"}
    assert await fit(no_max, size(no_max), 16384, False, PromptMemory(), tokenizer) is no_max
    assert tokenizer.calls == 0


# ---------------------------------------------------------------------------------- through the proxy
class FakeVllm:
    """Fakes what context fitting sees of a vLLM server: /version, /v1/models with max_model_len, /tokenize (a
    token per 4 bytes of the messages) and a streamed chat answer whose usage reports that count; refuses as its
    release does (``refusal``). Records each /tokenize call and each forwarded max_tokens."""

    version = ""

    def __init__(self, max_model_len: int = 32768) -> None:
        self.max_model_len = max_model_len
        self.tokenized = 0
        self.forwarded: list[int] = []
        self.refused = 0  # a 400 the proxy had to retry: the round trip fitting is there to save
        self.hold_tokenize = 0  # hold /tokenize answers until this many requests are being counted
        self.all_counting = asyncio.Event()

    def refusal(self, max_tokens: int, prompt: int) -> str | None:
        raise NotImplementedError

    def app(self) -> Starlette:
        def count(body: dict[str, Any]) -> int:
            return len(orjson.dumps(body["messages"])) // 4

        async def version(request: Request) -> Response:
            return JSONResponse({"version": self.version})

        async def models(request: Request) -> Response:
            return JSONResponse(
                {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": self.max_model_len}]}
            )

        async def tokenize(request: Request) -> Response:
            self.tokenized += 1
            if self.tokenized <= self.hold_tokenize:  # answer none until that many are waiting (bounded)
                self.all_counting.set() if self.tokenized == self.hold_tokenize else None
                await asyncio.wait_for(self.all_counting.wait(), 10)
            return JSONResponse({"count": count(await request.json()), "max_model_len": self.max_model_len})

        async def chat(request: Request) -> Response:
            body = await request.json()
            prompt = count(body)
            refused = self.refusal(body["max_tokens"], prompt)
            if refused is not None:
                self.refused += 1
                return JSONResponse(
                    {"error": {"message": refused, "type": "BadRequestError", "param": "max_tokens", "code": 400}},
                    status_code=400,
                )
            self.forwarded.append(body["max_tokens"])
            head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
            events = [
                {
                    **head,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}],
                },
                {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {
                    **head,
                    "choices": [],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1},
                },
            ]
            sse = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            return Response(sse, media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/version", version),
                Route("/v1/models", models),
                Route("/tokenize", tokenize, methods=["POST"]),
                Route("/v1/chat/completions", chat, methods=["POST"]),
            ]
        )


class FakeVllm0271(FakeVllm):
    """vLLM 0.27.1 (to 0.31.0): prompt + max_tokens over the context is a 400."""

    version = "0.27.1"

    def refusal(self, max_tokens: int, prompt: int) -> str | None:
        limit = self.max_model_len
        if max_tokens > limit:
            return (
                f"max_tokens={max_tokens} cannot be greater than max_model_len=max_total_tokens={limit}. "
                "Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})"
            )
        if prompt + max_tokens > limit:
            return (
                f"This model's maximum context length is {limit} tokens. However, you requested {max_tokens} "
                f"output tokens and your prompt contains {prompt} input tokens, for a total of "
                f"{prompt + max_tokens} tokens. Please reduce the length of the input prompt or the number of "
                f"requested output tokens. (parameter=input_tokens, value={prompt})"
            )
        return None


class FakeVllm0330(FakeVllm):
    """vLLM 0.33.0 (from 0.32.0): only max_tokens over the context is a 400; the rest it lowers itself."""

    version = "0.33.0"

    def refusal(self, max_tokens: int, prompt: int) -> str | None:
        if max_tokens > self.max_model_len:
            return (
                f"max_tokens={max_tokens} cannot be greater than max_model_len={self.max_model_len}. Please "
                f"request fewer output tokens. (parameter=max_tokens, value={max_tokens})"
            )
        return None


def kilo_session(turns: int) -> list[dict[str, Any]]:
    """An agent session: each turn repeats the one before plus a tool call, its result and the next user turn."""
    messages = list(FIRST)
    bodies = []
    for i in range(turns):
        bodies.append({**turn(list(messages)), "stream_options": {"include_usage": True}})
        messages += [
            {"role": "assistant", "content": f"reading part {i}"},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"part {i}: " + "code line\n" * 200},
            {"role": "user", "content": f"<environment_details>12:{i:02d}</environment_details>"},
        ]
    return bodies


@contextlib.contextmanager
def proxy_to(fake: FakeVllm, tmp_path: Path) -> Iterator[httpx.Client]:
    with (
        LoopbackServer(fake.app()) as upstream,
        LoopbackServer(
            create_app(
                ProxySettings(
                    upstream_url=f"{upstream.url}/v1",
                    cache_dir=tmp_path / "cache",
                    log_file=tmp_path / "proxy.log",
                    upstream_timeout=10.0,
                )
            )
        ) as proxy,
        httpx.Client(base_url=proxy.url, timeout=20) as client,
    ):
        yield client


def run_session(fake: FakeVllm, tmp_path: Path, turns: int = 5) -> None:
    with proxy_to(fake, tmp_path) as client:
        for number, body in enumerate(kilo_session(turns), 1):
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert b"data: [DONE]" in response.content
            # the answer's usage is learned as its flight ends, just before it is stored: as a user reads the
            # answer before typing the next turn
            wait_for_stored(client, number)


def test_a_kilo_session_on_vllm_0_33_never_asks_tokenize(tmp_path: Path) -> None:
    fake = FakeVllm0330(max_model_len=16384)
    run_session(fake, tmp_path)
    assert fake.tokenized == 0
    assert fake.refused == 0
    assert fake.forwarded == [16384] * 5  # capped at the context; the server lowers the rest


def test_a_kilo_session_on_vllm_0_27_asks_tokenize_on_its_first_turn_only(tmp_path: Path) -> None:
    fake = FakeVllm0271(max_model_len=32768)
    run_session(fake, tmp_path)
    assert fake.tokenized == 1
    assert fake.refused == 0 and len(fake.forwarded) == 5  # every turn fitted: none was refused and retried
    assert all(0 < tokens < 32000 for tokens in fake.forwarded)


def test_a_repeated_turn_on_vllm_0_27_is_a_hit_whatever_the_proxy_learned_meanwhile(tmp_path: Path) -> None:
    # turn 2 is first fitted by the bound from turn 1's count; its own answer then teaches the proxy its exact
    # count, so the same request fits differently the second time: a key on the fitted body missed and generated
    # again (and on a cold proxy would have asked /tokenize before the lookup)
    fake = FakeVllm0271(max_model_len=32768)
    first, second = kilo_session(2)
    with proxy_to(fake, tmp_path) as client:
        answers = []
        for number, body in enumerate((first, second, second), 1):
            answers.append(client.post("/v1/chat/completions", json=body))
            wait_for_stored(client, min(number, 2))
    assert [a.headers["x-cache"] for a in answers] == ["MISS", "MISS", "HIT"]
    assert len(fake.forwarded) == 2 and fake.tokenized == 1  # and the hit asked nothing upstream


def test_identical_turns_that_arrive_while_one_is_counted_share_one_generation(tmp_path: Path) -> None:
    # on an older vLLM a turn may wait for /tokenize before it launches; an identical one that came meanwhile
    # (a client's retry, two editor windows) must join it, not generate again
    fake = FakeVllm0271(max_model_len=32768)
    fake.hold_tokenize = 2  # both are being counted before either is answered
    first, *_ = kilo_session(1)
    with proxy_to(fake, tmp_path) as client, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/chat/completions", json=first), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert sorted(a.headers["x-cache"] for a in answers) in (["COALESCED", "MISS"], ["HIT", "MISS"])
    assert len(fake.forwarded) == 1
