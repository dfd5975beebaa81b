"""Issue 13's "Done when": what Kilo Code and Continue really send gets whole answers through the proxy from vLLM's
own server, started with exactly the ``vllm serve`` arguments manage_pod.py builds for the shipped pod_config.json.

The turns replayed are the recorded ones in tests/fixtures/clients/ (tools, Kilo's ``tool_choice: "auto"`` and
``max_tokens: 32000``, streamed with ``stream_options.include_usage``). The pod's arguments come from the real
``llmpod.pod.providers.vllm_args`` on a ``PodSpec`` built as ``Session._create`` builds it; the proxy is started
by the real ``Sidecars.ensure_proxy`` of a ``Session`` built as ``cli.build_session`` builds it (so with the environment
manage_pod.py gives the proxy). vLLM is tests/support/real_vllm.py's stub
server (vLLM 0.33.0's own API server, parsers and chat-template rendering on CPU; only the GPU engine is faked and
the model is its tiny-llama stand-in), with its ``--stub-tool-calls`` so a prompt that lists tools is answered with
a hermes-style tool call.

Not part of the default run: it needs a python with vllm installed. ``LLMPOD_VLLM_PYTHON=/tmp/vllm-venv/bin/python``
turns it on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from llmpod.errors import PodError
from llmpod.pod import Session, load_pod_config
from llmpod.pod.catalog import load_catalog, validate_config
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import REPO_ROOT, LocalProvider, PodSpec, vllm_args
from llmpod.pod.sidecars import Sidecars
from llmpod.pod.state import POD_NAME_PREFIX, PodState, RuntimePaths
from tests.support.real_vllm import PYTHON_ENV, real_vllm, vllm_available
from tests.support.servers import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "clients"
AGENT_TURNS = ["kilo_turn", "kilo_turn_after_tool", "continue_turn", "continue_turn_after_tool"]

_UNAVAILABLE = vllm_available()
needs_vllm = pytest.mark.skipif(
    _UNAVAILABLE is not None,
    reason=f"needs vLLM's own server, which cannot start here: {_UNAVAILABLE}; "
    f"{PYTHON_ENV}=/tmp/vllm-venv/bin/python turns it on",
)


@dataclass(frozen=True)
class Pod:
    """The real vLLM server standing in for the pod, the proxy in front of it, and the arguments it got."""

    proxy_url: str
    served_model: str
    args: list[str]


def pod_session(root: Path) -> Session:
    """The Session manage_pod.py builds (cli.build_session) for the shipped pod_config.json run from ``root``, a fresh
    directory (so the built-in catalog), with its own proxy port and cache so nothing shared is touched."""
    config = load_pod_config(REPO_ROOT / "pod_config.json").model_copy(
        update={"proxy_port": free_port(), "cache_dir": str(root / "cache")}
    )
    paths = RuntimePaths(root)
    paths.ensure()
    catalog = load_catalog(paths.catalog)
    model, gpus = validate_config(config, catalog)
    return Session(
        config=config,
        config_path=root / "pod_config.json",
        paths=paths,
        provider=LocalProvider(config, paths.pod_log),
        catalog=catalog,
        model=model,
        gpus=gpus,
        reporter=Reporter(),
    )


def pod_args(session: Session, api_key: str) -> list[str]:
    """``vllm serve`` arguments for the session's pod on its first GPU candidate, by the real ``vllm_args`` on a
    PodSpec built as ``Session._create`` builds it: a catalog or vllm_args change shows here."""
    max_len = session.config.max_model_len or session.model.context_length
    spec = PodSpec(f"{POD_NAME_PREFIX}clients", session.gpus[0], session.model, session.model.id, max_len, api_key)
    return vllm_args(spec, session.config)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """One vLLM (about 15 s to start) and one proxy for every replayed turn: each turn is a different request."""
    api_key = secrets.token_urlsafe(32)
    session = pod_session(tmp_path_factory.mktemp("pod"))
    args = pod_args(session, api_key)
    served = session.model.id
    # RunPodProvider.create hands the key to the pod as VLLM_API_KEY, not as an argument
    with real_vllm([*args, "--stub-tool-calls"], env={"VLLM_API_KEY": api_key}) as base:
        now = time.time()
        state = PodState(
            provider="runpod",
            phase="ready",
            pod_name=f"{POD_NAME_PREFIX}clients",
            pod_id="real-vllm",
            model_id=served,
            served_model=served,
            vllm_api_key=api_key,
            upstream_url=f"{base}/v1",
            created_at=now,
            ready_at=now,
            expires_at=now + 3600,
            idle_timeout_seconds=3600,
            proxy_port=session.config.proxy_port,
        )
        with running_proxy(session.sidecars, state) as proxy_url:
            yield Pod(proxy_url, served, args)


@contextlib.contextmanager
def running_proxy(sidecars: Sidecars, state: PodState) -> Iterator[str]:
    """The proxy manage_pod.py starts (with the environment it gives it) in front of ``state``'s upstream; its URL.
    Stopped on the way out, even when starting it failed: ensure_proxy spawns the detached proxy before it waits
    for its health, so a proxy that came up too late would outlive the test."""
    try:
        sidecars.ensure_proxy(state)
        yield sidecars.proxy_url(state)
    finally:
        sidecars.stop(keep_watchdog=True)


def hermes_parser(args: list[str]) -> bool:
    """Whether ``vllm serve`` ``args`` name the hermes tool-call parser (the shape of the stub's tool calls)."""
    return "--tool-call-parser=hermes" in args or ("--tool-call-parser", "hermes") in itertools.pairwise(args)


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())  # type: ignore[no-any-return]


def client_headers(fixture: dict[str, Any]) -> dict[str, str]:
    """The recorded headers, with the API key the README tells users to configure (`none`)."""
    headers = {k: v for k, v in fixture["headers"].items() if k != "authorization"}
    return {**headers, "authorization": "Bearer none"}


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order; anything else but blank lines and comments fails."""
    events = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
        else:
            assert line == "" or line.startswith(":"), f"not an SSE line: {line[:200]!r}"
    return events


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("turn", AGENT_TURNS)
def test_recorded_agent_turn_gets_a_whole_streamed_answer(pod: Pod, turn: str) -> None:
    fixture = load_fixture(turn)
    body = {**fixture["body"], "model": pod.served_model}
    tool_names = {tool["function"]["name"] for tool in body["tools"]}
    response = httpx.post(
        f"{pod.proxy_url}/v1/chat/completions",
        headers=client_headers(fixture),
        content=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        timeout=120,
    )
    assert response.status_code == 200, (
        f"{turn}: HTTP {response.status_code} from the proxy in front of vLLM started with "
        f"`vllm serve {' '.join(pod.args)}`: {response.text[:500]}"
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    # real vLLM does not carry the mock's mark: its answers are cached as vLLM's (llmpod/server_kind.py)
    assert response.headers["x-cache-kind"] == "vllm"

    events = sse_events(response.text)
    assert events and events[-1] == "[DONE]", f"{turn}: the stream does not end with [DONE]: {events[-3:]}"
    chunks = [json.loads(event) for event in events[:-1]]  # every other event is a JSON chunk
    assert all(chunk.get("object") == "chat.completion.chunk" for chunk in chunks), chunks[:3]

    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    content = "".join(choice["delta"].get("content") or "" for choice in choices)
    calls: dict[int, dict[str, str]] = {}
    for choice in choices:
        for call in choice["delta"].get("tool_calls") or []:
            slot = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            function = call.get("function") or {}
            slot["name"] += function.get("name") or ""
            slot["arguments"] += function.get("arguments") or ""
    assert calls or content, f"{turn}: neither content nor tool calls in {chunks}"
    if hermes_parser(pod.args):  # the stub's tool call is hermes-shaped: this parser must turn it into tool_calls
        assert calls, f"{turn}: the stub's <tool_call> did not come through as tool_calls: {content!r}"
    for call in calls.values():
        assert call["name"] in tool_names, f"{turn}: a call to {call['name']!r}, which the client did not offer"
        assert isinstance(json.loads(call["arguments"]), dict)

    finishes = [choice["finish_reason"] for choice in choices if choice.get("finish_reason")]
    assert len(finishes) == 1, f"{turn}: finish reasons {finishes}"
    assert finishes[0] == ("tool_calls" if calls else "stop"), f"{turn}: finish reason {finishes[0]}"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0, (
        f"{turn}: the last chunk is not the usage chunk include_usage asks for: {usage}"
    )
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]


class SidecarsTooSlow:
    """Sidecars whose proxy is spawned but not healthy in time: ensure_proxy raises after starting it."""

    def __init__(self) -> None:
        self.running = False

    def ensure_proxy(self, state: PodState) -> None:
        self.running = True
        raise PodError(f"the proxy did not start on port {state.proxy_port}")

    def proxy_url(self, state: PodState) -> str:
        return f"http://127.0.0.1:{state.proxy_port}"

    def stop(self, keep_watchdog: bool = False) -> None:
        self.running = False


def test_a_proxy_that_starts_too_late_is_stopped_all_the_same() -> None:
    sidecars = SidecarsTooSlow()
    state = PodState(
        provider="runpod",
        phase="ready",
        pod_name="p",
        model_id="m",
        served_model="m",
        vllm_api_key=SecretStr("k"),
        created_at=0,
        expires_at=1,
        idle_timeout_seconds=1,
        proxy_port=1,
    )
    with pytest.raises(PodError), running_proxy(sidecars, state):  # type: ignore[arg-type]
        pass
    assert not sidecars.running
