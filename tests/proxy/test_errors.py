"""Every error a client can meet through the proxy comes back in the OpenAI shape, and nothing partial is cached."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.proxy.test_app import chat, sse_events
from tests.support.helpers import SHORT_MODEL, MockControl, ProxyFactory, wait_for_stored
from tests.support.servers import LoopbackServer, free_port


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"\xff\xfe invalid utf-8", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_bad_bodies_are_400(client: httpx.Client, mock_control: MockControl, content: bytes, words: str) -> None:
    response = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert words in assert_openai_error(response, 400)["message"]
    assert mock_control.generations() == 0


def test_body_over_the_limit_is_413(start_proxy: ProxyFactory, mock_control: MockControl) -> None:
    proxy = start_proxy(max_body_bytes=4096)
    big = chat("x" * 10_000)
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=big, timeout=20)
    assert_openai_error(response, 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}, timeout=20
    )
    assert_openai_error(response, 413)
    assert mock_control.generations() == 0


def test_stream_must_be_boolean(client: httpx.Client) -> None:
    assert_openai_error(client.post("/v1/chat/completions", json=chat(stream="yes")), 400)


def test_upstream_validation_errors_pass_through(client: httpx.Client) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json={"model": SHORT_MODEL}), 400)
    assert error["type"] == "Bad Request"  # vLLM 0.33's word for FastAPI's body validation (a missing field)


def test_unreachable_upstream_is_502_naming_it(start_proxy: ProxyFactory) -> None:
    port = free_port()
    proxy = start_proxy(upstream_url=f"http://127.0.0.1:{port}/v1")
    for body in (chat(), chat(stream=True)):
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=20)
        error = assert_openai_error(response, 502)
        assert f"127.0.0.1:{port}" in error["message"]
    assert_openai_error(httpx.get(f"{proxy.url}/v1/models", timeout=20), 502)


def test_upstream_timeout_is_504(start_proxy: ProxyFactory, silent_upstream: str) -> None:
    proxy = start_proxy(upstream_url=silent_upstream, upstream_timeout=0.5)
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat(), timeout=20)
    error = assert_openai_error(response, 504)
    assert "did not answer within 0.5s" in error["message"]


def test_upstream_500_passes_through_and_is_not_cached(client: httpx.Client, mock_control: MockControl) -> None:
    mock_control.configure(error_rate=1.0)
    for body in (chat(), chat(stream=True)):
        assert_openai_error(client.post("/v1/chat/completions", json=body), 500)
    mock_control.configure(error_rate=0.0)
    assert client.post("/v1/chat/completions", json=chat()).headers["x-cache"] == "MISS"
    assert client.get("/metrics").json()["upstream_errors"] == 2


def test_rate_limit_passes_through_with_retry_after(client: httpx.Client, mock_control: MockControl) -> None:
    mock_control.configure(rate_limit_rate=1.0, retry_after=3)
    response = client.post("/v1/chat/completions", json=chat())
    assert assert_openai_error(response, 429)["type"] == "RateLimitError"
    assert response.headers["retry-after"] == "3"


@pytest.mark.parametrize("mock_vllm_settings", [{"wire_format": "legacy"}])
def test_old_flat_vllm_errors_are_normalised(client: httpx.Client, mock_vllm_settings: dict[str, Any]) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json={"model": SHORT_MODEL}), 400)
    assert error["type"] == "BadRequestError"


@pytest.mark.parametrize("mock_vllm_settings", [{"die_after_chunks": 3, "chunk_count": 20}])
def test_upstream_dying_mid_stream_ends_the_stream_with_an_error_and_caches_nothing(
    client: httpx.Client, mock_control: MockControl, tmp_path: Path, mock_vllm_settings: dict[str, Any]
) -> None:
    streamed = client.post("/v1/chat/completions", json=chat(stream=True))
    assert streamed.status_code == 200
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    assert "closed the connection mid-stream" in events[-2]["error"]["message"]
    assert len(events) - 2 <= 3  # the chunks that did arrive, then the error
    plain = client.post("/v1/chat/completions", json=chat())
    assert_openai_error(plain, 502)
    assert not list((tmp_path / "cache").glob("*.json"))
    assert client.get("/metrics").json()["cache_entries"] == 0
    assert mock_control.generations() == 2


def test_the_openai_sdk_raises_on_a_mid_stream_error(start_proxy: ProxyFactory, mock_control: MockControl) -> None:
    import openai

    mock_control.configure(die_after_chunks=2, chunk_count=20)
    proxy = start_proxy()
    sdk = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=0)
    stream = sdk.chat.completions.create(model=SHORT_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        for _ in stream:
            pass
    sdk.close()


def test_proxy_key_required_on_every_route_but_health(start_proxy: ProxyFactory) -> None:
    proxy = start_proxy(proxy_api_key="proxy-secret")
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        assert http.get("/health").status_code == 200
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("GET", "/debug/cache"),
            ("DELETE", "/debug/cache"),
        ):
            assert_openai_error(http.request(method, path, json=chat()), 401)
            wrong = http.request(method, path, json=chat(), headers={"Authorization": "Bearer nope"})
            assert_openai_error(wrong, 401)
        ok = http.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer proxy-secret"})
        assert ok.status_code == 200
        assert http.get("/v1/models", headers={"api-key": "proxy-secret"}).status_code == 200


def test_upstream_key_is_sent_and_never_shown(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    from llmpod.mock.server import MockSettings, create_app

    secret = "vllm-key-for-this-pod-0123456789"
    with LoopbackServer(create_app(MockSettings(model="m", api_key=secret))) as keyed:
        proxy = start_proxy(upstream_url=f"{keyed.url}/v1", upstream_api_key=secret)
        unkeyed = start_proxy(upstream_url=f"{keyed.url}/v1", cache_dir=tmp_path / "other")
        with httpx.Client(timeout=20) as http:
            ok = http.post(f"{proxy.url}/v1/chat/completions", json={**chat(), "model": "m"})
            assert ok.status_code == 200
            wait_for_stored(http, 1, base=proxy.url)
            refused = http.post(f"{unkeyed.url}/v1/chat/completions", json={**chat(), "model": "m"})
            assert "UPSTREAM_API_KEY" in assert_openai_error(refused, 401)["message"]
            seen = [
                ok.text,
                refused.text,
                http.get(f"{proxy.url}/health").text,
                http.get(f"{proxy.url}/metrics").text,
                http.get(f"{proxy.url}/debug/cache").text,
            ]
    seen.append((tmp_path / "proxy.log").read_text())
    seen.extend(p.read_text() for p in (tmp_path / "cache").glob("*.json"))
    assert not any(secret in text for text in seen)


def test_unknown_route_is_an_openai_shaped_404(client: httpx.Client) -> None:
    assert_openai_error(client.get("/v1/nothing-here"), 404)
    assert_openai_error(client.get("/debug/cache", params={"limit": "many"}), 400)


def test_a_bug_in_the_proxy_is_a_clean_500_and_the_proxy_stays_up(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken_key(endpoint: str, body: dict[str, Any], kind: str) -> str:
        raise RuntimeError("secret internals")

    with monkeypatch.context() as patched:
        patched.setattr("llmpod.proxy.generation.cache_key", broken_key)
        response = client.post("/v1/chat/completions", json=chat("a bug"))
        error = assert_openai_error(response, 500)
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert error["message"] == "internal proxy error (logged)"
    assert "RuntimeError: secret internals" in (tmp_path / "proxy.log").read_text()  # the details go to the log
    assert client.post("/v1/chat/completions", json=chat("a bug")).status_code == 200
