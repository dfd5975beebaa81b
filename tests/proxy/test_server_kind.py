"""Cached answers name the kind of server that gave them (issue 16, "Answers that are not what they claim").

The mock (``llmpod.mock``) serves the same model id as a real pod, so after ``manage_pod.py --local`` the first
questions to a real pod were answered from the mock's cache. Here the "real vLLM" is the mock with its mark
turned off (``mark_kind=False``): it answers as vLLM 0.33 does, without the ``x-llmpod-kind`` header.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from llmpod.mock import MockSettings
from llmpod.mock import create_app as create_mock
from llmpod.server_kind import KIND_HEADER
from tests.support.helpers import SERVED_MODEL, MockControl, ProxyFactory
from tests.support.servers import LoopbackServer, free_port

UNKNOWN_NOTE = "no cached answer is served until the upstream has answered once"


def chat(content: str = "def hello") -> dict[str, Any]:
    # the served id itself: the key is the same whether or not the proxy could resolve an alias
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 20}


@contextmanager
def pod(*, marked: bool) -> Iterator[LoopbackServer]:
    """A server for SERVED_MODEL on a port of its own: a real vLLM's look-alike (unmarked) or the mock."""
    settings = MockSettings(model=SERVED_MODEL, max_model_len=4096, mark_kind=marked)
    with LoopbackServer(create_mock(settings)) as server:
        yield server


def ask(proxy: LoopbackServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=20)


def proxy_for(start_proxy: ProxyFactory, upstream: str, kind: str | None) -> LoopbackServer:
    return start_proxy(upstream_url=f"{upstream}/v1", upstream_kind=kind)


# --------------------------------------------------------------------------------- the mock's answers stay its own
@pytest.mark.parametrize("told", [None, "vllm"], ids=["run-by-hand", "pod-manager-says-vllm"])
def test_an_answer_the_mock_gave_is_a_miss_for_a_real_vllm_of_the_same_model(
    start_proxy: ProxyFactory, mock_vllm: LoopbackServer, told: str | None
) -> None:
    local = proxy_for(start_proxy, mock_vllm.url, "mock")  # what manage_pod.py --local starts
    assert [ask(local, chat()).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    local.stop()
    with pod(marked=False) as real:
        proxy = proxy_for(start_proxy, real.url, told)  # same cache directory, same model id and body
        first = ask(proxy, chat())
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")  # was a HIT: the mock's answer
        assert MockControl(real.url).generations() == 1  # the real pod answered, not the mock's cache
        assert first.headers["x-cache-kind"] == "vllm"
        assert ask(proxy, chat()).headers["x-cache"] == "HIT"  # its own answer is cached, under its own kind


def test_an_answer_a_real_vllm_gave_is_a_miss_for_the_mock(
    start_proxy: ProxyFactory, mock_vllm: LoopbackServer
) -> None:
    with pod(marked=False) as real:
        remote = proxy_for(start_proxy, real.url, "vllm")
        assert ask(remote, chat()).headers["x-cache"] == "MISS"
        remote.stop()
    local = proxy_for(start_proxy, mock_vllm.url, "mock")
    answered = ask(local, chat())
    assert answered.headers["x-cache"] == "MISS"
    assert MockControl(mock_vllm.url).generations() == 1
    assert answered.headers["x-cache-kind"] == "mock"


# ---------------------------------------------------------------------------- answers survive a pod replacement
@pytest.mark.parametrize(("marked", "kind"), [(False, "vllm"), (True, "mock")])
@pytest.mark.parametrize("told", [True, False], ids=["kind-given", "kind-learnt"])
def test_an_answer_survives_the_pod_being_replaced_by_one_of_the_same_kind(
    start_proxy: ProxyFactory, marked: bool, kind: str, told: bool
) -> None:
    with pod(marked=marked) as old:
        first = proxy_for(start_proxy, old.url, kind if told else None)
        stored = ask(first, chat())
        assert stored.headers["x-cache"] == "MISS"
        first.stop()
    with pod(marked=marked) as new:  # another port, another start time: nothing of it is in the key
        assert new.url != old.url
        second = proxy_for(start_proxy, new.url, kind if told else None)
        again = ask(second, chat())
        assert (again.headers["x-cache"], again.headers["x-cache-key"]) == ("HIT", stored.headers["x-cache-key"])
        assert again.json() == stored.json()
        assert MockControl(new.url).generations() == 0
        listed = httpx.get(f"{second.url}/debug/cache", timeout=5).json()["entries"]
        assert [(e["key"], e["kind"]) for e in listed] == [(stored.headers["x-cache-key"], kind)]


def test_a_replacement_pod_still_starting_finds_the_answers_when_the_pod_manager_named_the_kind(
    start_proxy: ProxyFactory,
) -> None:
    with pod(marked=False) as old:
        first = proxy_for(start_proxy, old.url, "vllm")
        stored = ask(first, chat())
        first.stop()
    starting = f"http://127.0.0.1:{free_port()}"  # nothing listens yet: the new pod is loading its weights
    proxy = proxy_for(start_proxy, starting, "vllm")
    again = ask(proxy, chat())
    assert (again.status_code, again.headers["x-cache"]) == (200, "HIT")
    assert again.json() == stored.json()


# ------------------------------------------------------------------------------------ unknown kind: never a hit
def test_with_the_kind_unknown_no_cached_answer_is_served_and_the_error_says_why(start_proxy: ProxyFactory) -> None:
    with pod(marked=False) as old:
        first = proxy_for(start_proxy, old.url, "vllm")
        ask(first, chat())
        first.stop()
    down = f"http://127.0.0.1:{free_port()}"
    proxy = proxy_for(start_proxy, down, None)  # run by hand, and the upstream never answered
    answered = ask(proxy, chat())
    assert answered.status_code == 502
    assert (answered.headers["x-cache"], answered.headers["x-cache-kind"]) == ("BYPASS", "unknown")
    assert "x-cache-key" not in answered.headers
    assert UNKNOWN_NOTE in answered.json()["error"]["message"]
    health = httpx.get(f"{proxy.url}/health", timeout=5).json()
    assert health["upstream"]["kind"] is None


def test_with_the_kind_unknown_an_answer_is_forwarded_and_teaches_the_kind(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    with pod(marked=False) as real:
        proxy = proxy_for(start_proxy, real.url, None)
        answered = ask(proxy, chat())
        # the model list answered first (the alias lookup asks it): the kind is known before the key is made
        assert (answered.status_code, answered.headers["x-cache"], answered.headers["x-cache-kind"]) == (
            200,
            "MISS",
            "vllm",
        )
        assert httpx.get(f"{proxy.url}/health", timeout=5).json()["upstream"]["kind"] == "vllm"


# ------------------------------------------------------------------------------------------ the mark wins
def test_the_upstreams_mark_wins_over_the_setting_with_one_log_line(
    start_proxy: ProxyFactory, mock_vllm: LoopbackServer, tmp_path: Path
) -> None:
    local = proxy_for(start_proxy, mock_vllm.url, "mock")
    cached = ask(local, chat())
    local.stop()
    told_wrong = proxy_for(start_proxy, mock_vllm.url, "vllm")  # the mock, though the setting says vLLM
    answers = [ask(told_wrong, chat()) for _ in range(3)]
    assert [(r.headers["x-cache"], r.headers["x-cache-kind"]) for r in answers] == [("HIT", "mock")] * 3
    assert answers[0].headers["x-cache-key"] == cached.headers["x-cache-key"]
    said = [line for line in (tmp_path / "proxy.log").read_text().splitlines() if "not vllm" in line]
    assert len(said) == 1 and "answers as mock" in said[0]


def test_a_server_swapped_behind_a_running_proxy_gets_answers_of_its_own_kind(
    start_proxy: ProxyFactory, mock_vllm: LoopbackServer, mock_control: MockControl
) -> None:
    proxy = proxy_for(start_proxy, mock_vllm.url, None)
    assert [ask(proxy, chat("q1")).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    mock_control.configure(mark_kind=False)  # now it answers as a real vLLM would, within the model list's TTL
    swapped = ask(proxy, chat("q2"))  # keyed as the mock's (the list is not asked again), answered by "vLLM"
    assert (swapped.status_code, swapped.headers["x-cache-kind"]) == (200, "mock")
    # not stored under the mock's key: the stream said who answered, and the proxy now looks up vLLM's answers
    assert [
        (r.headers["x-cache"], r.headers["x-cache-kind"]) for r in (ask(proxy, chat("q1")), ask(proxy, chat("q2")))
    ] == [
        ("MISS", "vllm"),
        ("MISS", "vllm"),
    ]
    assert ask(proxy, chat("q2")).headers["x-cache"] == "HIT"
    assert mock_control.generations() == 4


def test_the_mark_is_not_passed_on_to_clients(start_proxy: ProxyFactory, mock_vllm: LoopbackServer) -> None:
    proxy = proxy_for(start_proxy, mock_vllm.url, "mock")
    models = httpx.get(f"{proxy.url}/v1/models", timeout=5)
    assert models.status_code == 200 and KIND_HEADER not in models.headers
    assert KIND_HEADER not in ask(proxy, chat()).headers


# ------------------------------------------------------------------------------- the proxy's view, step by step
UPSTREAM = "http://vllm.test:8000"


@pytest.mark.parametrize("told", [None, "vllm"])
async def test_an_upstream_that_cannot_be_reached_is_asked_again_before_its_kind_is_trusted(told: str | None) -> None:
    from llmpod.proxy import ProxySettings
    from llmpod.proxy.upstream import Upstream

    listing = {"object": "list", "data": [{"id": SERVED_MODEL, "object": "model", "max_model_len": 4096}]}
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as router:
        router.get("/version").respond(404)
        models = router.get("/v1/models")
        async with httpx.AsyncClient() as client:
            upstream = Upstream(ProxySettings(upstream_url=f"{UPSTREAM}/v1", upstream_kind=told), client)
            assert upstream.kind == told  # before any answer: what the pod manager said, or unknown
            models.respond(json=listing, headers={KIND_HEADER: "mock"})
            await upstream.models()
            assert upstream.kind == "mock"  # the mark wins
            models.mock(side_effect=httpx.ConnectError("refused"))
            upstream._models_at -= 120  # a minute later: the list has expired
            assert await upstream.models() is not None  # the list is kept ...
            assert upstream.kind == told  # ... but not the kind: another server may come up at that address
            models.mock(side_effect=None)
            models.respond(json=listing)  # it did: a real vLLM, no mark
            await upstream.models()  # asked again at once, not after the list's minute
            assert upstream.kind == "vllm"
