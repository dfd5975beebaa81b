"""Detached helper processes: started in their own session, found by pid file and marker, stopped for sure."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from llmpod.pod import PodConfig, processes
from llmpod.pod.progress import Reporter
from llmpod.pod.sidecars import PROXY_MARKER, PROXY_OF, WATCHDOG_OF, Sidecars
from llmpod.pod.state import RuntimePaths
from llmpod.proxy_settings import DRAIN_SECONDS, STOP_MARGIN_SECONDS

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


def _sidecars(root: Path) -> Sidecars:
    return Sidecars(PodConfig(provider="local"), root / "pod_config.json", RuntimePaths(root), Reporter())


def test_shutdown_never_signals_a_process_that_only_has_the_marker_in_argv(tmp_path: Path) -> None:
    """A pid file naming someone else's process whose command line merely contains ``--watchdog`` (or
    ``llmpod.proxy``): --shutdown must leave it alone."""
    sidecars = _sidecars(tmp_path)
    sidecars.paths.ensure()
    argv = [sys.executable, "-c", SLEEPER, "--watchdog", "llmpod.proxy"]
    pid = processes.spawn_detached(argv, env=dict(os.environ), log_path=tmp_path / "other.log", pid_path=None)
    try:
        processes.write_pid(sidecars.paths.watchdog_pid, pid)
        processes.write_pid(sidecars.paths.proxy_pid, pid)
        sidecars.stop()
        assert processes.alive(pid)
    finally:
        processes.stop(pid, grace=1)


def test_a_pid_file_older_than_its_process_is_not_trusted(tmp_path: Path) -> None:
    """The right marker and owner mark, but started after the pid file was written: the pid was recycled."""
    sidecars = _sidecars(tmp_path)
    sidecars.paths.ensure()
    env = {**os.environ, WATCHDOG_OF: str(tmp_path)}
    argv = [sys.executable, "-c", SLEEPER, "--watchdog"]
    pid = processes.spawn_detached(argv, env=env, log_path=tmp_path / "w.log", pid_path=sidecars.paths.watchdog_pid)
    try:
        owner = sidecars.owner(WATCHDOG_OF)
        assert processes.running(sidecars.paths.watchdog_pid, "--watchdog", owner) == pid  # ours: trusted
        written = time.time() - 60
        os.utime(sidecars.paths.watchdog_pid, (written, written))
        assert processes.running(sidecars.paths.watchdog_pid, "--watchdog", owner) is None
        assert processes.stop_pidfile(sidecars.paths.watchdog_pid, "--watchdog", owner=owner, grace=1)
        assert processes.alive(pid)
    finally:
        processes.stop(pid, grace=1)


def test_the_proxy_gets_its_drain_before_it_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SIGTERM the proxy lets requests finish for its PROXY_DRAIN_SECONDS (llmpod/proxy/drain.py): --shutdown,
    a restart and the watchdog wait that long plus the margin to end and flush, read from the proxy's own
    environment (the shell running --shutdown may say otherwise), before any SIGKILL."""
    sidecars = _sidecars(tmp_path)
    sidecars.paths.ensure()
    graces: list[float] = []
    stop = processes.stop
    monkeypatch.setattr(processes, "stop", lambda pid, grace=10.0: graces.append(grace) or stop(pid, grace))
    monkeypatch.setenv("PROXY_DRAIN_SECONDS", "1")
    for drain, expected in (("40", 40 + STOP_MARGIN_SECONDS), ("", DRAIN_SECONDS + STOP_MARGIN_SECONDS)):
        env = {**os.environ, PROXY_OF: str(tmp_path), "PROXY_DRAIN_SECONDS": drain}
        argv = [sys.executable, "-c", SLEEPER, PROXY_MARKER]
        pid = processes.spawn_detached(argv, env=env, log_path=tmp_path / "p.log", pid_path=sidecars.paths.proxy_pid)
        try:
            graces.clear()
            sidecars.stop(keep_watchdog=True)
            assert graces == [expected] and not processes.alive(pid)
        finally:
            processes.stop(pid, grace=1)
