"""tests/support/real_vllm.py's process handling, without vLLM: the server's process group is signalled only while its
leader is our unreaped child, because once reaped its pid, and so the group id, may be another process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import real_vllm


def only_while_unreaped(sent: list[tuple[int, int]]) -> Any:
    def killpg(pgid: int, sig: int) -> None:
        # raises ChildProcessError if the leader was reaped: its group id may have been reused by then
        os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        sent.append((pgid, sig))

    return killpg


def test_a_reaped_server_gets_no_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen([sys.executable, "-c", ""], start_new_session=True)
    proc.wait()
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    real_vllm._stop(proc)
    assert sent == []


def test_a_server_exiting_at_start_is_reported_and_signalled_only_unreaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = tmp_path / "serve_stub.py"  # stands in for vLLM refusing its arguments
    stub.write_text("import sys\nprint('Error: --enable-auto-tool-choice requires --tool-call-parser')\nsys.exit(3)\n")
    monkeypatch.setenv(real_vllm.STUB_ENV, str(stub))
    monkeypatch.setenv(real_vllm.PYTHON_ENV, sys.executable)
    monkeypatch.setattr(real_vllm, "vllm_available", lambda: None)
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", only_while_unreaped(sent))
    with (
        pytest.raises(RuntimeError, match="exited with 3") as refused,
        real_vllm.real_vllm(["--enable-auto-tool-choice"]),
    ):
        pass
    assert "requires --tool-call-parser" in str(refused.value)
