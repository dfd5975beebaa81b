"""manage_pod.py against a pod whose container dies at every start, as processes (the fake RunPod restarts it).

The pod reads RUNNING and bills while vLLM never answers: the user must get exit 1 and one line quoting the log
line that explains it within a few minutes of billing, with the pod terminated, not a wait of
ready_timeout_seconds. The CUDA mismatch and a gated model are the cost-safety fault rows
(tests/faults/test_cost_safety.py); here: out of memory, and a local process that exits at start.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e_harness import FakeRunPod, Workdir, assert_nothing_left, vllm_crash_lines

pytestmark = pytest.mark.slow

TRACEBACK = "Traceback (most recent call last)"
# Long enough that the code before crash-loop detection (which waited for it) overran the test's 120 s
READY_TIMEOUT = 900
BILLED = re.compile(r"\(terminated after (\d+)s, (?:about \$\d+\.\d\d|under \$0\.01) billed\)$")


def crash_line(stderr: str) -> str:
    """The one line manage_pod.py ends with."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("manage_pod.py: pod llmpod-"), stderr[-2000:]
    return last


def test_a_crash_looping_pod_is_terminated_with_the_line_that_explains_it(
    workdir: Workdir, fake_runpod: FakeRunPod
) -> None:
    fake_runpod.configure(crash_loop=vllm_crash_lines("cuda_oom"), crash_after_seconds=3)
    workdir.write_config(ready_timeout_seconds=READY_TIMEOUT)
    up = workdir.run()
    assert up.returncode == 1, up.stderr
    line = crash_line(up.stderr)
    assert " crash-loops: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 270.00 MiB." in line
    billed = BILLED.search(line)
    assert billed is not None and int(billed.group(1)) < 180, line  # a few minutes at most, not half an hour
    assert TRACEBACK not in up.stderr
    [pod] = fake_runpod.state()["pods"]
    assert pod["deleted"] and pod["history"][-1]["status"] == "TERMINATED"
    assert_nothing_left(workdir, fake_runpod)
    status = workdir.run("--status")
    assert status.returncode == 0 and "crash-loops" in status.stdout  # the last session says why it ended


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
