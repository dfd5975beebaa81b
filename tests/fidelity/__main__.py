"""``python3 -m tests.fidelity``: compare the mock with the golden files; ``--live`` re-records them from vLLM.

``--live`` needs ``LLMPOD_VLLM_PYTHON`` (a python with vllm 0.33 installed) and the shared real-vLLM tool
(see tests/support/real_vllm.py); it starts vLLM's own server once per server configuration of the corpus (about 15 s
each) and rewrites ``tests/fidelity/golden/``. It is never part of the default test run or CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx

from tests.fidelity.compare import capture, differences, normalize
from tests.fidelity.corpus import CASES, SERVERS, Case

GOLDEN = Path(__file__).resolve().parent / "golden"


def golden_path(case: Case) -> Path:
    return GOLDEN / f"{case.name}.json"


def load_golden(case: Case) -> dict:
    return dict(json.loads(golden_path(case).read_text()))


async def mock_answer(case: Case) -> dict:
    from llmpod.mock.server import MockSettings, create_app

    app = create_app(MockSettings(**SERVERS[case.server].mock))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mock") as client:
        return await capture(client, case)


async def _record(url: str, cases: list[Case]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for case in cases:
            recording = await capture(client, case)
            golden_path(case).write_text(json.dumps({"request": case.request(), **recording}, indent=1) + "\n")
            print(f"  {case.name}: {recording['status']}")


def record(selected: list[Case]) -> int:
    from tests.support.real_vllm import real_vllm, vllm_available, vllm_version

    reason = vllm_available()
    if reason:
        print(f"cannot record: {reason}", file=sys.stderr)
        return 2
    GOLDEN.mkdir(exist_ok=True)
    version = vllm_version()
    for server in SERVERS.values():
        cases = [c for c in selected if c.server == server.name]
        if not cases:
            continue
        print(f"vLLM {version} {server.name}: {' '.join(server.vllm_args)}")
        with real_vllm(server.vllm_args) as url:
            asyncio.run(_record(url, cases))
    meta = {
        "vllm": version,
        "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "servers": {name: s.vllm_args for name, s in SERVERS.items()},
    }
    (GOLDEN / "_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


def stale(case: Case, golden: dict) -> list[str]:
    """Why ``golden`` is not vLLM's answer to ``case`` as the corpus now sends it (empty when it is)."""
    recorded = golden.get("request")
    if recorded == case.request():
        return []
    return [
        f"$.request: recorded {json.dumps(recorded)}, corpus sends {json.dumps(case.request())}; re-record (--live)"
    ]


def check(selected: list[Case]) -> int:
    failed = 0
    for case in selected:
        golden = load_golden(case)
        found = stale(case, golden) or differences(
            normalize(golden, case), normalize(asyncio.run(mock_answer(case)), case)
        )
        print(f"{'ok  ' if not found else 'DIFF'} {case.name}")
        for line in found:
            print(f"     {line}")
        failed += bool(found)
    print(f"{len(selected) - failed}/{len(selected)} cases match vLLM")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.fidelity", description=__doc__)
    parser.add_argument("--live", action="store_true", help="re-record the golden files from vLLM's own server")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.cases) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    selected = [c for c in CASES if not args.cases or c.name in args.cases]
    return record(selected) if args.live else check(selected)


if __name__ == "__main__":
    sys.exit(main())
