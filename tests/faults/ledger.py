"""What each fault test injected and how it ended, for the reliability table (``python3 -m tests.faults``).

A fault test injects its faults, counts what went wrong from the user's side, and hands the counts to
``FaultLedger.record``, which writes them down *and then* fails the test if any count is above zero: the
table shows a failure with its numbers instead of losing it to an assertion that fired first.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

LEDGER_ENV = "LLMPOD_FAULT_LEDGER"  # set by the runner: where records are appended, one JSON line each

AREAS = ("cost safety", "proxy faults", "bad input", "load", "security", "hostile neighbour", "several models")

# What counts as a failure, each with the target zero. The table prints them in this order.
FAILURES: dict[str, str] = {
    "lost_answers": "lost answers",  # a request that got neither a complete answer nor a clean error
    "corrupt_served": "corrupt served",  # a partial, mixed-up or corrupt answer served (cache or live)
    "leaked_processes": "leaked processes",  # a helper, proxy, mock or watchdog outliving its shutdown
    "leaked_ports": "leaked ports",  # a port still listening after everything was stopped
    "pods_left_running": "pods left running",  # a pod the user did not ask to keep, still billing
    "unrecorded_pods": "pods unaccounted",  # a pod neither in pod_state.json nor in the leaked-pods listing
    "dirty_errors": "dirty errors",  # a 5xx that is not an honest 502/504, a traceback, a hang, exit != expected
    "secrets_exposed": "secrets exposed",  # a key in a log, listing, error, /debug output or world-readable file
    # a hostile neighbour got what it was after: read or cleared the cache, generated, planted an answer, kept
    # the pod billing, had a process or a pod that is not ours stopped
    "attacks_worked": "attacks that worked",
}


@dataclass
class FaultRecord:
    area: str
    kind: str
    injected: int
    failures: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    test: str = ""

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


class FaultLedger:
    """Records for one test; appended to the runner's ledger file when it runs us."""

    def __init__(self, test: str, path: Path | None) -> None:
        self.test = test
        self.path = path
        self.records: list[FaultRecord] = []

    def record(
        self, area: str, kind: str, *, injected: int, notes: list[str] | None = None, **failures: int
    ) -> FaultRecord:
        """Write down ``injected`` faults of ``kind`` and what they ended with; fail the test on any failure.

        ``failures`` takes the keys of ``FAILURES`` (anything else is a typo, and an error); ``notes`` are
        short, secret-free descriptions of each failure, shown when the test fails.
        """
        if area not in AREAS:
            raise ValueError(f"unknown area {area!r}; one of {AREAS}")
        unknown = set(failures) - set(FAILURES)
        if unknown:
            raise ValueError(f"unknown failure kinds {sorted(unknown)}; known: {sorted(FAILURES)}")
        if injected < 1:
            raise ValueError("a fault record needs at least one injected fault")
        entry = FaultRecord(
            area, kind, injected, {k: int(v) for k, v in failures.items() if v}, list(notes or []), self.test
        )
        self.records.append(entry)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as ledger:
                ledger.write(json.dumps(asdict(entry)) + "\n")
        if entry.failed:
            counts = ", ".join(f"{FAILURES[k]}: {v}" for k, v in entry.failures.items())
            shown = "; ".join(entry.notes[:5])
            raise AssertionError(f"{area} / {kind}: {counts} (of {injected} injected){': ' + shown if shown else ''}")
        return entry


def ledger_path() -> Path | None:
    value = os.environ.get(LEDGER_ENV)
    return Path(value) if value else None


def read_ledger(path: Path) -> list[FaultRecord]:
    if not path.exists():
        return []
    return [FaultRecord(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
