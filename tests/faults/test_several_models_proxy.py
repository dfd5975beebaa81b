"""Several models behind one proxy process (issue 18): one model's server SIGKILLed mid-answer, again and again.

``proxy_fastapi.py`` as a user runs it, with ``PROXY_BACKENDS`` naming two mock servers (processes). Each round,
requests to both models are in flight when one server is killed and then started again on its port. Every request
is judged from the client's side (tests/faults/answers.py): its own complete answer or a clean OpenAI-shaped
502/503/504, never a hang, a traceback or another model's answer; the other model never fails; the killed one is
healthy again after each restart. Counts go to the fault ledger ("proxy faults").
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.servers import ServerProcess, base_env
from tests.faults.answers import Tally, ask
from tests.faults.hostile import proxy_process
from tests.faults.ledger import FaultLedger
from tests.faults.proxy_runner import ROOT
from tests.support.helpers import wait_until
from tests.support.servers import free_port

AREA = "proxy faults"
CHUNKS = 8
ROUNDS = 3
IN_FLIGHT = 6  # requests per model per round
MARGIN = 30.0  # a request unanswered this long is a hang (the machine is shared)


class MockOnPort(ServerProcess):
    """``mock_vllm_server.py`` on a port fixed beforehand: restarted where the proxy expects it."""

    def __init__(self, tmp_path: Path, model: str, port: int, chunk_delay: float) -> None:
        argv = [sys.executable, str(ROOT / "mock_vllm_server.py"), "--port", str(port), "--model", model]
        argv += ["--chunk-count", str(CHUNKS), "--chunk-delay", str(chunk_delay), "--max-model-len", "4096"]
        super().__init__(model, argv, base_env({}), tmp_path / f"{model}.log", start_timeout=60)
        self.fixed_port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.fixed_port}"


def body(model: str, prompt: str, stream: bool) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64}
    if stream:
        request.update(stream=True, stream_options={"include_usage": True})
    return request


# soak: the full fault run counts it; the default run has the same behaviour in tests/proxy/test_models.py
@pytest.mark.soak
def test_one_backend_killed_mid_answer_repeatedly(tmp_path: Path, fault_ledger: FaultLedger) -> None:
    gpt = MockOnPort(tmp_path, "mock-gpt", free_port(), chunk_delay=0.15)
    llama = MockOnPort(tmp_path, "mock-llama", free_port(), chunk_delay=0.01)
    backends = [
        {"id": "mock-gpt", "base_url": f"{gpt.url}/v1", "kind": "mock"},
        {"id": "mock-llama", "base_url": f"{llama.url}/v1", "kind": "mock"},
    ]
    proxy = proxy_process(
        tmp_path, "http://127.0.0.1:9/v1", PROXY_BACKENDS=json.dumps(backends), PROXY_HEALTH_INTERVAL="0.2"
    )
    killed_tally, other_tally = Tally(), Tally()
    notes: list[str] = []
    recovered = 0
    try:
        gpt.start()
        llama.start()
        proxy.start()
        health = f"{proxy.url}/health"
        wait_until(lambda: httpx.get(health).json()["status"] == "healthy", "both models healthy", timeout=30)

        async def round_(number: int) -> None:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=MARGIN + 10) as http:
                cut = [
                    asyncio.ensure_future(
                        ask(
                            http,
                            body("mock-gpt", f"round {number} cut {n}", n % 2 == 0),
                            chunk_count=CHUNKS,
                            deadline=MARGIN,
                            allowed=frozenset({502, 503, 504}),
                        )
                    )
                    for n in range(IN_FLIGHT)
                ]
                deadline = time.monotonic() + 20
                while (await http.get(f"{gpt.url}/mock/stats")).json()["requests"].get(
                    "chat.completions", 0
                ) < IN_FLIGHT:
                    assert time.monotonic() < deadline, "the requests never reached the model's server"
                    await asyncio.sleep(0.02)
                assert gpt.process is not None
                gpt.process.send_signal(signal.SIGKILL)  # mid-answer: every one of them is cut
                others = [
                    ask(
                        http,
                        body("mock-llama", f"round {number} other {n}", n % 2 == 1),
                        chunk_count=CHUNKS,
                        deadline=MARGIN,
                        allowed=frozenset(),
                    )
                    for n in range(IN_FLIGHT)
                ]
                for verdict in await asyncio.gather(*others):
                    other_tally.add(verdict)
                for verdict in await asyncio.gather(*cut):
                    killed_tally.add(verdict)

        for number in range(ROUNDS):
            asyncio.run(round_(number))
            gpt.stop(grace=1)  # reaps the killed process
            state = httpx.get(health).json()["models"]["mock-gpt"]["state"]
            if state != "down":
                notes.append(f"round {number}: the killed model was {state}, not down")
            gpt.start()
            wait_until(lambda: httpx.get(health).json()["status"] == "healthy", "the model back", timeout=30)
            recovered += 1
        per_model = httpx.get(f"{proxy.url}/metrics").json()["models"]
        if per_model["mock-gpt"]["upstream_errors"] < ROUNDS * IN_FLIGHT // 2:
            notes.append(f"only {per_model['mock-gpt']['upstream_errors']} upstream errors counted for the cut model")
        if per_model["mock-llama"]["upstream_errors"] or other_tally.errors:
            notes.append(f"the other model failed: {other_tally.summary()}")
    finally:
        proxy.stop()
        gpt.stop()
        llama.stop()
    fault_ledger.record(
        AREA,
        "several models: one model's server SIGKILLed mid-answer (3 rounds), restarted on its port",
        injected=ROUNDS,
        notes=[*notes, *killed_tally.notes, *other_tally.notes],
        lost_answers=killed_tally.lost_answers + other_tally.lost_answers + (ROUNDS - recovered),
        corrupt_served=killed_tally.corrupt_served + other_tally.corrupt_served,
        dirty_errors=killed_tally.dirty_errors + other_tally.dirty_errors + len(notes),
    )
    assert killed_tally.requests == other_tally.requests == ROUNDS * IN_FLIGHT
