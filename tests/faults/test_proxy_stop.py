"""The proxy stopped (SIGTERM, as --shutdown and the watchdog stop it) with streams and plain requests in flight:
each client gets its whole answer or an OpenAI-shaped error, never a cut stream or a text/plain 500, and no
traceback reaches a log (issue 16). Counted in the fault ledger ("proxy faults")."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.faults.hostile import ERROR_FIELDS, proxy_process
from tests.faults.ledger import FaultLedger
from tests.faults.proxy_runner import mock_process, running
from tests.proxy.test_drain import Call
from tests.support.helpers import SERVED_MODEL, MockControl, wait_until

GRACE = 4.0
LONG, SHORT = 1000, 30  # tokens at 0.05 s each: well past the grace; 1.5 s, within it


def _body(prompt: str, tokens: int, stream: bool) -> dict[str, object]:
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "stream": stream}  # fmt: skip


def _problem(call: Call) -> str | None:
    """Why what ``call`` got is not a whole answer or a clean OpenAI error (None when it is)."""
    if call.error is not None:
        return f"cut: {type(call.error).__name__}"
    if call.status == 200 and call.body["stream"]:
        events = call.events()
        if not events or events[-1] != b"[DONE]":
            return "a stream without [DONE]"
        if b'"error"' in events[-2]:
            error = json.loads(events[-2])["error"]
            return None if set(error) == ERROR_FIELDS else f"error event not OpenAI-shaped: {error}"
        return None
    if call.status == 200:
        return None if json.loads(call.content)["choices"] else "an empty answer"
    if call.status != 503 or not call.content_type.startswith("application/json"):
        return f"{call.status} {call.content_type}: {call.content[:80]!r}"
    return None if set(json.loads(call.content)["error"]) == ERROR_FIELDS else "503 not OpenAI-shaped"


# soak: the full fault run counts it; the default run has the same behaviour in tests/proxy/test_drain.py
@pytest.mark.soak
@pytest.mark.parametrize("rounds", [5])
def test_sigterm_with_requests_in_flight_ends_each_cleanly(
    tmp_path: Path, fault_ledger: FaultLedger, rounds: int
) -> None:
    notes: list[str] = []
    lost = dirty = injected = 0
    with running(mock_process(tmp_path, "mock", "--chunk-delay", "0.05", "--chunk-count", str(LONG))) as mock:
        control = MockControl(mock.url)
        for round_ in range(rounds):
            proxy = proxy_process(tmp_path, f"{mock.url}/v1", PROXY_DRAIN_SECONDS=str(GRACE))
            with running(proxy):
                calls = [
                    Call(proxy.url, _body(f"{kind} {stream} {round_}", tokens, stream))
                    for kind, tokens in (("long", LONG), ("short", SHORT))
                    for stream in (True, False)
                ]
                for call in calls:
                    call.start()
                # every request reached the proxy and is generating: a request still in the kernel's buffers when
                # the stop comes meets a closing connection, as with any server (clients retry those)
                wait_until(lambda: control.stats()["in_flight"] == 4, "the 4 requests generating upstream")
                assert proxy.process is not None
                proxy.process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                proxy.process.wait(timeout=GRACE + 30)
                for call in calls:
                    call.join(15)
                    injected += 1
                    problem = "still waiting" if call.is_alive() else _problem(call)
                    if problem:
                        lost += 1
                        notes.append(f"{call.body['messages']}: {problem}")  # type: ignore[index]
                if time.monotonic() - started > GRACE + 15:
                    dirty += 1
                    notes.append(f"exit took {time.monotonic() - started:.1f} s for a {GRACE} s drain")
            text = proxy.log_path.read_text(errors="replace") if proxy.log_path.exists() else ""
            if "Traceback" in text or "Exception in ASGI" in text:
                dirty += 1
                notes.append("a traceback in the proxy's log")
        wait_until(lambda: control.stats()["in_flight"] == 0, "interrupted generations cancelled upstream", 15)
    fault_ledger.record("proxy faults", "SIGTERM with streams and plain requests in flight", injected=injected,
                        lost_answers=lost, dirty_errors=dirty, notes=notes)  # fmt: skip
