"""What a web page must not do to the proxy: DNS rebinding (Host/Origin) and text/plain CSRF (issue 16)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llmpod.proxy.settings import ProxySettings
from tests.support.helpers import SHORT_MODEL, MockControl, ProxyFactory, wait_for_stored


def chat(content: str = "a question from a browser test") -> dict[str, Any]:
    return {"model": SHORT_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 20}


def assert_openai_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["code"] == status


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("path", ["/debug/cache", "/health", "/v1/models", "/metrics"])
def test_a_rebound_host_is_refused_on_every_route(client: httpx.Client, method: str, path: str) -> None:
    client.post("/v1/chat/completions", json=chat())
    wait_for_stored(client, 1)
    response = client.request(method, path, headers={"Host": "evil.example"})
    assert_openai_error(response, 421)
    assert "PROXY_ALLOWED_HOSTS" in response.json()["error"]["message"]
    assert client.get("/debug/cache").json()["total"] == 1  # nothing listed, nothing deleted


def test_a_rebound_host_cannot_generate(client: httpx.Client, mock_control: MockControl) -> None:
    response = client.post("/v1/chat/completions", json=chat(), headers={"Host": "evil.example:8000"})
    assert_openai_error(response, 421)
    assert mock_control.generations() == 0


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:9", "[::1]", "[::1]:8000"])
def test_this_machines_names_are_served(client: httpx.Client, host: str) -> None:
    assert client.get("/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_setting_widens_the_names(start_proxy: ProxyFactory) -> None:
    proxy = start_proxy(allowed_hosts=("llm.lan",))
    with httpx.Client(base_url=proxy.url, timeout=20) as http:
        assert http.get("/debug/cache", headers={"Host": "llm.lan:8000"}).status_code == 200
        assert http.get("/debug/cache", headers={"Origin": "http://llm.lan"}).status_code == 200
        assert http.get("/debug/cache", headers={"Host": "evil.example"}).status_code == 421


@pytest.mark.parametrize("origin", ["https://evil.example", "http://evil.example:8000", "null", "file://"])
def test_a_foreign_origin_is_refused_without_cors_grants(client: httpx.Client, origin: str) -> None:
    response = client.get("/debug/cache", headers={"Origin": origin})
    assert_openai_error(response, 403)
    assert "access-control-allow-origin" not in response.headers
    post = client.post("/v1/chat/completions", json=chat(), headers={"Origin": origin})
    assert_openai_error(post, 403)


def test_a_local_origin_is_served(client: httpx.Client) -> None:
    assert client.get("/debug/cache", headers={"Origin": "http://localhost:3000"}).status_code == 200
    assert client.get("/debug/cache", headers={"Origin": "http://127.0.0.1"}).status_code == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None]
)
def test_a_non_json_post_is_refused_and_not_generated(
    client: httpx.Client, mock_control: MockControl, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = client.post(path, content=json.dumps(chat()).encode(), headers=headers)
        assert_openai_error(response, 415)
    assert mock_control.generations() == 0
    assert client.get("/debug/cache").json()["total"] == 0


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_is_served(client: httpx.Client, content_type: str) -> None:
    response = client.post(
        "/v1/chat/completions", content=json.dumps(chat()).encode(), headers={"Content-Type": content_type}
    )
    assert response.status_code == 200


def test_allowed_hosts_round_trip_through_the_environment() -> None:
    settings = ProxySettings.from_env({"PROXY_ALLOWED_HOSTS": " llm.lan, box.local ,"})
    assert settings.allowed_hosts == ("llm.lan", "box.local")
    assert ProxySettings.from_env(settings.to_env()) == settings
