"""Run every fault, abuse and leak test and print how many faults were injected and how they ended.

    python3 -m tests.faults                 # everything, the soak-marked long runs included
    python3 -m tests.faults --quick         # only what the default test run has
    python3 -m tests.faults --json out.json -- -k proxy   # pytest arguments after --

Exit 0 only if pytest passed and every failure count is zero.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from tests.faults.ledger import AREAS, FAILURES, LEDGER_ENV, FaultRecord, read_ledger

ROOT = Path(__file__).resolve().parents[2]


def summarise(records: list[FaultRecord]) -> list[dict[str, object]]:
    """One row per (area, kind), in area order, summing injected faults and failures."""
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for record in records:
        row = rows.setdefault(
            (record.area, record.kind),
            {"area": record.area, "kind": record.kind, "injected": 0, "tests": 0, **dict.fromkeys(FAILURES, 0)},
        )
        row["injected"] = int(row["injected"]) + record.injected  # type: ignore[call-overload]
        row["tests"] = int(row["tests"]) + 1  # type: ignore[call-overload]
        for name, count in record.failures.items():
            row[name] = int(row[name]) + count  # type: ignore[call-overload]
    return sorted(rows.values(), key=lambda r: (AREAS.index(str(r["area"])), str(r["kind"])))


def table(rows: list[dict[str, object]]) -> str:
    headers = ["area", "fault injected", "n", *FAILURES.values()]
    body = [[str(r["area"]), str(r["kind"]), str(r["injected"]), *(str(r[k]) for k in FAILURES)] for r in rows]
    totals: dict[str, int] = defaultdict(int)
    for r in rows:
        for name in ("injected", *FAILURES):
            totals[name] += int(r[name])  # type: ignore[call-overload]
    body.append(["**total**", f"{len(rows)} kinds", str(totals["injected"]), *(str(totals[k]) for k in FAILURES)])
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([render(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(render, body)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.faults", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the soak-marked long runs")
    parser.add_argument("--json", type=Path, help="also write the rows and totals to this file")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="llmpod-faults-") as scratch:
        ledger = Path(scratch) / "ledger.jsonl"
        env = {**os.environ, LEDGER_ENV: str(ledger)}
        marks = "not soak" if args.quick else ""
        started = time.monotonic()
        command = [
            sys.executable,
            "-m",
            "pytest",
            "tests/faults",
            "-m",
            marks,
            "-q",
            "-p",
            "no:cacheprovider",
            *args.pytest_args,
        ]
        print("running:", " ".join(command), file=sys.stderr, flush=True)
        outcome = subprocess.run(command, cwd=ROOT, env=env, check=False)
        elapsed = time.monotonic() - started
        records = read_ledger(ledger)

    rows = summarise(records)
    failed = sum(r.failed for r in records)
    print()
    print(
        f"llmpod fault, abuse and leak tests: {sum(r.injected for r in records)} faults injected in "
        f"{len(records)} records, {elapsed:.0f} s, pytest exit {outcome.returncode}"
    )
    print(table(rows))
    verdict = (
        "every failure count is zero"
        if failed == 0 and outcome.returncode == 0
        else (f"{failed} failures counted; pytest exit {outcome.returncode}")
    )
    print(f"result: {verdict}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "elapsed_s": round(elapsed, 1),
                    "pytest_exit": outcome.returncode,
                    "rows": rows,
                    "records": [asdict(r) for r in records],
                },
                indent=2,
            )
        )
    return 0 if failed == 0 and outcome.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
