"""The mock marks every answer as the mock's (``x-llmpod-kind: mock``), so the proxy never serves its answers for a
real pod; with ``mark_kind`` off it looks exactly like vLLM, which sends no such header. Bodies are the same
either way (the fidelity tier compares them with vLLM's own)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from llmpod.mock import MockSettings, create_app
from llmpod.mock import cli as mock_vllm_server
from llmpod.server_kind import KIND_HEADER, MOCK, VLLM, kind_of

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# every kind of answer: plain and streamed generations, listings, probes, and errors from each layer
REQUESTS: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
    ("GET", "/v1/models", None, {}),
    ("GET", "/health", None, {}),
    ("GET", "/version", None, {}),
    ("GET", "/metrics", None, {}),
    ("POST", "/v1/chat/completions", CHAT, {}),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, {}),
    ("POST", "/v1/chat/completions", {**CHAT, "model": "nope"}, {}),  # 404 from the route
    ("GET", "/v1/models", None, {"Authorization": "Bearer wrong"}),  # 401 from the key middleware
    ("GET", "/no-such-route", None, {}),  # 404 from the router
]


async def answers(settings: MockSettings) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=create_app(settings))
    right = {"Authorization": "Bearer right"}
    async with httpx.AsyncClient(transport=transport, base_url="http://mock", headers=right) as client:
        return [await client.request(m, path, json=body, headers=headers) for m, path, body, headers in REQUESTS]


async def test_every_answer_says_it_is_the_mocks() -> None:
    got = await answers(MockSettings(api_key="right"))
    assert [r.status_code for r in got][-3:] == [404, 401, 404]
    assert [r.headers.get(KIND_HEADER) for r in got] == [MOCK] * len(REQUESTS)
    assert {kind_of(r.headers) for r in got} == {MOCK}


async def test_without_the_mark_it_answers_as_a_real_vllm_with_the_same_bodies() -> None:
    marked = await answers(MockSettings(api_key="right"))
    plain = await answers(MockSettings(api_key="right", mark_kind=False))
    assert all(KIND_HEADER not in r.headers for r in plain)
    assert {kind_of(r.headers) for r in plain} == {VLLM}
    # the same shapes: the /v1/models listing (no random ids in the mock's but its created time) and the errors
    for a, b in zip(marked, plain, strict=True):
        assert (a.status_code, a.headers.get("content-type")) == (b.status_code, b.headers.get("content-type"))
        if a.status_code >= 400:
            assert a.content == b.content


async def test_the_mark_can_be_switched_live() -> None:
    transport = httpx.ASGITransport(app=create_app(MockSettings()))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        assert (await client.get("/health")).headers[KIND_HEADER] == MOCK
        assert (await client.post("/mock/config", json={"mark_kind": False})).status_code == 200
        assert KIND_HEADER not in (await client.get("/health")).headers


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, True),
        (["--mark-kind", "false"], {}, False),
        ([], {"MOCK_MARK_KIND": "0"}, False),
    ],
)
def test_the_mark_from_flags_and_environment(argv: list[str], env: dict[str, str], expected: bool) -> None:
    assert mock_vllm_server.parse(argv, env)[0].mark_kind is expected


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        ({}, VLLM),
        ({KIND_HEADER: "mock"}, MOCK),
        ({KIND_HEADER: " Mock "}, MOCK),
        ({KIND_HEADER: "sglang-mock"}, "sglang-mock"),  # a kind added later keys its own answers
        ({KIND_HEADER: "a b\nc"}, None),  # not a name: unknown, never trusted into a key
        ({KIND_HEADER: "x" * 40}, None),
    ],
)
def test_kind_of_headers(headers: dict[str, str], kind: str | None) -> None:
    assert kind_of(headers) == kind
