"""README "Several models": Continue's autocomplete request, as Continue builds it, through the proxy.

What Continue sends (its VS Code extension 1.3.40, continuedev/continue d0a3c0b): ``CompletionStreamer`` calls
``streamFim`` (``{apiBase}fim/completions``, which neither vLLM nor the proxy serves) only when the provider's
``supportsFim()`` is true, and it is false for ``openai`` and ``vllm``. Otherwise ``CompletionProvider`` forces
``useLegacyCompletionsEndpoint`` and ``OpenAI._legacystreamComplete`` POSTs ``{apiBase}completions`` with a
``prompt`` that already holds the fill-in-the-middle tokens of the template ``getTemplateForModel`` picks from the
``model`` name (no ``suffix`` field), ``stream: true``, ``temperature`` 0.01, ``max_tokens`` and the template's stop
words. So the README must name the model as its server does, and reach it over ``/llm/{id}/v1``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpod.backends import Backend
from llmpod.mock.server import create_app as create_mock
from llmpod.mock.state import MockSettings
from llmpod.proxy.app import create_app
from llmpod.proxy.settings import ProxySettings
from tests.support.helpers import wait_until
from tests.support.servers import LoopbackServer

README = Path(__file__).resolve().parents[2] / "README.md"
# Continue 1.3.40's stableCodeFimTemplate stops plus getStopTokens' common ones: more than OpenAI's 4.
STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>", "</code>"]
STOPS += ["/src/", "#- coding: utf-8", "```"]


def section() -> str:
    return README.read_text().split("## Several models", 1)[1]


def continue_models() -> list[dict[str, str]]:
    """The ``models:`` of the section's Continue ``config.yaml``, read line by line (flat keys are all it has)."""
    block = section().split("```yaml\n", 1)[1].split("```", 1)[0]
    models: list[dict[str, str]] = []
    for line in block.splitlines():
        stripped = line.split(" #", 1)[0].strip()
        if stripped.startswith("- "):
            models.append({})
            stripped = stripped[2:]
        if models and ":" in stripped:
            key, value = stripped.split(":", 1)
            models[-1][key.strip()] = value.strip()
    return models


def readme_model_ids() -> list[str]:
    block = section().split("```json\n", 1)[1].split("```", 1)[0]
    return list(json.loads(block)["llmModels"])


def autocomplete_entry() -> dict[str, str]:
    (entry,) = [m for m in continue_models() if "autocomplete" in m.get("roles", "")]
    return entry


def test_the_readme_names_the_served_model_over_its_own_base_url() -> None:
    entry = autocomplete_entry()
    assert entry["provider"] in ("openai", "vllm")  # the providers whose supportsFim() is false
    ids = readme_model_ids()
    # Continue picks its FIM tokens from this name: the routing id would get StarCoder's tokens whatever runs.
    assert entry["model"] not in ids
    base = entry["apiBase"]
    assert base.startswith("http://localhost:8000/llm/") and base.endswith("/v1")
    assert base.removeprefix("http://localhost:8000/llm/").removesuffix("/v1") in ids


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    """The README's two models as in-process mocks, each serving its id as its name (as the README's mocks do)."""
    servers = {
        model_id: LoopbackServer(create_mock(MockSettings(model=model_id))).start() for model_id in readme_model_ids()
    }
    backends = tuple(Backend(id=i, base_url=f"{s.url}/v1", served_model=i, kind="mock") for i, s in servers.items())
    settings = ProxySettings(
        cache_dir=tmp_path / "cache", log_file=tmp_path / "proxy.log", backends=backends, health_interval=0.2
    )
    app = LoopbackServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=app.url, timeout=20) as client:
            wait_until(lambda: client.get("/health").json()["status"] == "healthy", "models healthy", timeout=15)
            yield client, {i: s.url for i, s in servers.items()}
    finally:
        for server in (app, *servers.values()):
            server.stop()


def test_continues_autocomplete_request_streams_through_the_proxy(proxy: tuple[httpx.Client, dict[str, str]]) -> None:
    http, _ = proxy
    entry = autocomplete_entry()
    # BaseLLM adds the trailing slash, then new URL("completions", apiBase).
    path = httpx.URL(entry["apiBase"].rstrip("/") + "/completions").path
    body: dict[str, Any] = {
        "model": entry["model"],
        "max_tokens": 4096,
        "temperature": 0.01,
        "stream": True,
        "stop": STOPS,
        "prompt": "<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n\nprint(add(1, 2))\n<|fim_middle|>",
    }
    headers = {"Authorization": f"Bearer {entry['apiKey']}", "api-key": entry["apiKey"]}
    answer = http.post(path, json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    served = path.split("/")[2] if path.startswith("/llm/") else entry["model"]
    assert {c["model"] for c in chunks} == {served}  # the name Continue sent was rewritten to the server's


def test_fim_completions_is_not_served(proxy: tuple[httpx.Client, dict[str, str]]) -> None:
    """Why the README must not use a provider whose supportsFim() is true (deepseek, mistral...) with the proxy."""
    http, _ = proxy
    body = {"model": "autocomplete", "prompt": "def add(a, b):\n    return ", "suffix": "\n", "stream": True}
    assert http.post("/llm/autocomplete/v1/fim/completions", json=body).status_code == 404
