"""The official openai Python SDK, as editors' assistants use it, drives the proxy in both stream modes."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.support.helpers import SERVED_MODEL, SHORT_MODEL, MockControl
from tests.support.servers import LoopbackServer

QUESTION = [{"role": "user", "content": "Write a function to reverse a string"}]


@pytest.fixture
def sdk(proxy: LoopbackServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-local-proxy", max_retries=0) as client:
        yield client


def test_sdk_non_stream_then_cache_hit(sdk: openai.OpenAI, mock_control: MockControl) -> None:
    first = sdk.chat.completions.with_raw_response.create(model=SHORT_MODEL, messages=QUESTION, max_tokens=64)
    second = sdk.chat.completions.with_raw_response.create(model=SHORT_MODEL, messages=QUESTION, max_tokens=64)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    completion = second.parse()
    assert completion.model == SERVED_MODEL
    assert completion.choices[0].message.content == first.parse().choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert mock_control.generations() == 1


def test_sdk_stream_with_usage_like_kilo_code_then_cache_hit(sdk: openai.OpenAI, mock_control: MockControl) -> None:
    def run() -> tuple[str, int, str | None]:
        text, completion_tokens, finish = "", 0, None
        stream = sdk.chat.completions.create(
            model=SHORT_MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}, max_tokens=32000
        )
        for chunk in stream:
            if chunk.usage is not None:
                assert chunk.choices == []
                completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, completion_tokens, finish

    first, second = run(), run()
    assert first == second
    assert first[0] and first[1] > 0 and first[2] in ("stop", "length")
    assert mock_control.generations() == 1
    plain = sdk.chat.completions.create(model=SHORT_MODEL, messages=QUESTION, max_tokens=32000)
    assert plain.choices[0].message.content == first[0]  # the stream's entry serves the plain request


def test_sdk_lists_models_and_raises_not_found(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == [SERVED_MODEL]
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert caught.value.status_code == 404
    assert SERVED_MODEL in str(caught.value)


async def test_async_sdk_completions_endpoint(proxy: LoopbackServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=0) as client:
        plain = await client.completions.create(model=SHORT_MODEL, prompt="def reverse(s):", max_tokens=16)
        stream = await client.completions.create(
            model=SHORT_MODEL, prompt="def reverse(s):", max_tokens=16, stream=True
        )
        text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == plain.choices[0].text
