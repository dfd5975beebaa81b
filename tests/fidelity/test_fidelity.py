"""The mock answers every corpus request as vLLM 0.33.0's own server did (tests/fidelity/golden/, recorded by
``python3 -m tests.fidelity --live``); what the comparison ignores is listed in tests/fidelity/compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fidelity.__main__ import GOLDEN, load_golden, mock_answer, stale
from tests.fidelity.compare import differences, normalize
from tests.fidelity.corpus import CASES, SERVERS, Case
from tests.support.real_vllm import server_argv


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_the_mock_answers_as_vllm_did(case: Case) -> None:
    found = differences(normalize(load_golden(case), case), normalize(await mock_answer(case), case))
    assert not found, f"{case.name} ({case.method} {case.path} on the {case.server!r} server):\n" + "\n".join(found)


def test_every_case_has_a_recording_from_vllm_0_33_0() -> None:
    meta = json.loads((GOLDEN / "_meta.json").read_text())
    assert meta["vllm"] == "0.33.0"
    assert meta["servers"] == {name: server.vllm_args for name, server in SERVERS.items()}
    recorded = {p.stem for p in GOLDEN.glob("*.json")} - {"_meta"}
    assert recorded == {c.name for c in CASES}, "re-record: python3 -m tests.fidelity --live"
    for case in CASES:
        assert not stale(case, load_golden(case)), case.name


def test_the_comparison_sees_a_difference() -> None:
    case = next(c for c in CASES if c.name == "chat_unknown_model")
    golden = load_golden(case)
    wrong = json.loads(json.dumps(golden))
    wrong["json"]["error"]["message"] = "The model `nope` does not exist."
    assert differences(normalize(golden, case), normalize(wrong, case)) == [
        "$.json.error.message: vLLM 'The model `nope` does not exist. Valid aliases: my-model.', "
        "mock 'The model `nope` does not exist.'"
    ]


def test_the_harness_serves_a_pods_arguments_on_loopback() -> None:
    script = Path("/shared/tools/real-vllm/serve_stub.py")
    pod = [
        "--model",
        "Qwen/Qwen2.5-Coder-7B-Instruct",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--max-model-len",
        "16384",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]
    assert server_argv(pod, 18123, script) == [
        "--model",
        "/shared/tools/real-vllm/tiny-llama",
        "--max-model-len",
        "16384",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--served-model-name",
        "Qwen/Qwen2.5-Coder-7B-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        "18123",
    ]
    named = server_argv(["--model=org/m", "--served-model-name", "m"], 1, script)
    assert named == [
        "--model",
        "/shared/tools/real-vllm/tiny-llama",
        "--served-model-name",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        "1",
    ]
