"""manage_pod.py against a pod whose container dies at every start, as processes (the fake RunPod restarts it).

The pod reads RUNNING and bills while vLLM never answers: the user must get exit 1 and one line quoting the log
line that explains it within a few minutes of billing, with the pod terminated, not a wait of
ready_timeout_seconds. The CUDA mismatch and a gated model are the cost-safety fault rows
(tests/faults/test_cost_safety.py); out of memory is decided in-process (tests/pod/test_session.py); here: a local
process that exits at start, whose words come from the real mock's log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.e2e_harness import Workdir, assert_nothing_left

pytestmark = pytest.mark.slow

# Long enough that the code before crash-loop detection (which waited for it) overran the test's 120 s
READY_TIMEOUT = 900


def crash_line(stderr: str) -> str:
    """The one line manage_pod.py ends with."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("manage_pod.py: pod llmpod-"), stderr[-2000:]
    return last


def test_a_local_process_that_exits_at_start_is_not_waited_on(tmp_path: Path) -> None:
    work = Workdir(tmp_path, None)
    work.write_config(
        ready_timeout_seconds=READY_TIMEOUT,
        provider="local",
        args=["--port", "{port}", "--model", "{model}", "--no-such-flag"],
    )
    try:
        up = work.run()
        assert up.returncode == 1, up.stderr
        line = crash_line(up.stderr)
        assert "exited at start: mock_vllm_server.py: error: unrecognized arguments: --no-such-flag" in line
        assert_nothing_left(work, None)
    finally:
        if work.state_file.exists():
            work.run("--shutdown", "--all", timeout=60)
