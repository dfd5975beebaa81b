"""Detached helper processes: started in their own session, found by pid file and marker, stopped for sure."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from llmpod.pod import processes

SLEEPER = "import time; time.sleep(60)"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)


def test_spawn_find_and_stop(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    pid = processes.spawn_detached(
        [sys.executable, "-c", SLEEPER, "--marker-x"],
        env={"SECRET_IN_ENV": "s3cret"},
        log_path=tmp_path / "sleeper.log",
        pid_path=pid_file,
    )
    try:
        assert processes.read_pid(pid_file) == pid
        assert oct(pid_file.stat().st_mode)[-3:] == "600"
        assert os.getsid(pid) != os.getsid(0)  # its own session: the user's Ctrl-C does not reach it
        assert processes.running(pid_file, "--marker-x") == pid
        assert processes.running(pid_file, "--other-marker") is None  # a recycled pid is never trusted
        assert processes.find_by_environ("SECRET_IN_ENV", "s3cret") == [pid]
        assert processes.stop_pidfile(pid_file, "--marker-x", grace=5)
        assert not processes.alive(pid)
        assert not pid_file.exists()
    finally:
        processes.stop(pid, grace=1)


def test_stop_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    pid = processes.spawn_detached([sys.executable, "-c", STUBBORN], env=dict(os.environ), log_path=log, pid_path=None)
    try:
        deadline = time.monotonic() + 10
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes.stop(pid, grace=0.5)
        assert not processes.alive(pid)
    finally:
        processes.stop(pid, grace=0.1)


def test_missing_or_garbage_pid_file(tmp_path: Path) -> None:
    assert processes.running(tmp_path / "none.pid", "x") is None
    (tmp_path / "bad.pid").write_text("not a pid")
    assert processes.running(tmp_path / "bad.pid", "x") is None
    assert processes.stop_pidfile(tmp_path / "bad.pid", "x")
