"""The benchmark runs end to end with its smallest settings, prints its table, writes its JSON, and leaves
no server, port or temp directory behind. No timing assertions: the figures are the benchmark's business."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _processes_with(marker: str) -> list[int]:
    """Pids whose environment mentions ``marker`` (every server the benchmark starts inherits its TMPDIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_benchmark_smoke(tmp_path: Path) -> None:
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    out = tmp_path / "bench.json"
    env = {**os.environ, "TMPDIR": str(temp_root)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_proxy.py"), "--quick", "--duration", "0.5", "--rounds", "1",
         "--only", "hits,passthrough,coalescing", "--entries", "200", "--coalesce-clients", "20", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| metric" in result.stdout and "cache hit req/s" in result.stdout, result.stdout
    assert "upstream calls" in result.stdout, result.stdout

    data = json.loads(out.read_text())
    assert data["errors"] == {}
    hits = data["sections"]["hits"]["scenarios"]["hits"]["median"]
    for clients in ("1", "16"):
        assert hits[clients]["rps"] > 0
        assert hits[clients]["p50_ms"] > 0
    # the miss floor (bench/floor_app.py) forwards to the mock and is measured beside the proxy's misses
    passthrough = data["sections"]["passthrough"]
    for scenario in ("floor", "miss", "bypass"):
        assert passthrough["scenarios"][scenario]["median"]["1"]["rps"] > 0, scenario
    assert passthrough["derived"]["miss"]["added_over_floor_p50_ms"]["1"] is not None
    coalescing = data["sections"]["coalescing"]["runs"]
    assert len(coalescing) == 1 and coalescing[0]["statuses"] == {"200": 20}
    assert isinstance(coalescing[0]["upstream_calls_mock"], int)
    assert {t["section"] for t in data["targets"]} >= {"hits", "passthrough", "coalescing"}

    # nothing left behind: no process, no listening port, no temp directory
    assert _processes_with(str(temp_root)) == []
    assert data["ports"] and not any(_listening(port) for port in data["ports"])
    assert list(temp_root.iterdir()) == []
