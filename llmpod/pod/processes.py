"""Detached helper processes (the proxy, the watchdog, a local "pod"): start, find, stop, verify.

Each runs in its own session (Ctrl-C in the user's terminal does not reach it) with output to a log file and
its pid in a pid file. A pid file is trusted only if that pid still runs a command line carrying the
expected marker, has the owner mark we put in its environment, and started before the pid file was written:
so neither a recycled pid nor another program with the marker in its arguments is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from llmpod._files import atomic_write

# Popen objects of the processes we started. Kept so that they are never garbage-collected while their
# process runs on purpose (Popen warns about that); alive() reaps any that exit.
_SPAWNED: list[subprocess.Popen[bytes]] = []
# how the processes we started and reaped ended (negative: the signal), for the supervisor's "why it died"
_EXITED: dict[int, int] = {}

HOLD_AT = "LLMPOD_HOLD_AT"  # tests only: see checkpoint()
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding llmpod/


def checkpoint(phase: str) -> None:
    """Fault injection for tests: when ``LLMPOD_HOLD_AT`` names ``phase``, say so on stderr and wait there (at
    most 10 minutes) so a test can kill us exactly between two steps that no outside hold separates."""
    if os.environ.get(HOLD_AT) != phase:
        return
    print(f"holding at {phase}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.05)  # a signal's handler (KeyboardInterrupt) runs here


def python_module(module: str) -> list[str]:
    """The command that runs one of our packages (``llmpod.proxy``, ``llmpod.mock``, ``llmpod.pod``)."""
    return [sys.executable, "-m", module]


# Secrets of ours by name (the Hugging Face token's variable is the config's hf_token_env: callers add it),
# and any variable whose name says it holds one (OPENAI_API_KEY, GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, PGPASSWORD):
# a child is given only the secrets it uses, so a helper's crash dump, /proc/<pid>/environ or a library that
# logs its environment cannot spill the RunPod key (which can create and delete billed pods) or the HF token.
OUR_SECRETS = (
    "RUNPOD_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "PROXY_API_KEY",
    "UPSTREAM_API_KEY",
    "VLLM_API_KEY",
)
# (at the end of the name: MOCK_FIRST_TOKEN_DELAY is a setting, not a token)
SECRET_NAME = re.compile(r"(?:^|_)(?:API_?KEY|TOKEN|SECRET|PRIVATE_KEY|ACCESS_KEY|CREDENTIALS?)$|PASSW(?:OR)?D", re.I)


def child_env(
    env: Mapping[str, str], *, keep: Iterable[str] = (), secrets: Iterable[str] = (), by_name: bool = True
) -> dict[str, str]:
    """``env`` without the secrets a child does not use: ours (``OUR_SECRETS`` and ``secrets``) and, with
    ``by_name``, any whose name looks like one; those in ``keep`` stay."""
    kept = set(keep)
    dropped = (set(OUR_SECRETS) | set(secrets)) - kept
    return {k: v for k, v in env.items() if k in kept or not (k in dropped or (by_name and SECRET_NAME.search(k)))}


def importable(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the folder holding ``llmpod`` first on PYTHONPATH: a checkout run as ``python3 manage_pod.py``
    is not installed, and ``python -m llmpod.proxy`` from another working directory must still find it."""
    paths = [str(PACKAGE_ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def spawn_detached(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, pid_path: Path | None, cwd: Path | None = None
) -> int:
    """Start ``argv`` in a new session; secrets go in ``env``, never in ``argv`` (``ps`` shows argv)."""
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        process = subprocess.Popen(
            list(argv),
            env=importable(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    _SPAWNED.append(process)
    if pid_path is not None:
        write_pid(pid_path, process.pid)
    return process.pid


def write_pid(pid_path: Path, pid: int) -> None:
    atomic_write(pid_path, f"{pid}\n".encode(), mode=0o600, exact_mode=True)


def read_pid(pid_path: Path) -> int | None:
    try:
        text = pid_path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (a zombie has exited; it only waits to be reaped)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def started_at(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds, at most a second early), None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return float(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, StopIteration, ValueError, IndexError):
        return None


# how much later than its pid file's mtime a process of ours may seem to start: the wall clock stepped
START_SLACK = 2.0


def running(pid_path: Path, marker: str, owner: tuple[str, str] | None = None) -> int | None:
    """The pid in ``pid_path`` if it is alive, its command line contains ``marker`` and, with ``owner`` (a
    variable and its value), it is ours: that mark in its environment (anyone can put a marker in argv) and
    a start no later than the pid file's writing (a pid recycled since then started after it)."""
    pid = read_pid(pid_path)
    if pid is None or not alive(pid) or marker not in cmdline(pid):
        return None
    if owner is not None:
        started = started_at(pid)
        try:
            written = pid_path.stat().st_mtime
        except OSError:
            return None
        if environ_value(pid, owner[0]) != owner[1] or started is None or started > written + START_SLACK:
            return None
    return pid


def stop(pid: int, grace: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds; True once the process is verified gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return True
            time.sleep(0.05)
    return not alive(pid)


def stop_pidfile(pid_path: Path, marker: str, grace: float = 10.0, owner: tuple[str, str] | None = None) -> bool:
    """Stop the process named by ``pid_path`` (if it is ours: see ``running``) and remove the file. True if
    nothing of ours is left."""
    pid = running(pid_path, marker, owner)
    gone = True if pid is None else stop(pid, grace)
    if gone:
        with contextlib.suppress(FileNotFoundError):
            pid_path.unlink()
    return gone


def environ_value(pid: int, key: str) -> str | None:
    """``key`` in the environment of process ``pid`` (None if unset or unreadable)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{key}=".encode()
    for item in environ:
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def find_by_environ(key: str, value: str | None = None) -> list[int]:
    """Live processes whose environment has ``key`` (set to ``value`` when given): how helpers and local
    "pods" started by an earlier run are found again."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        seen = environ_value(pid, key)
        if seen is not None and (value is None or seen == value) and alive(pid):
            found.append(pid)
    return found


def exit_status(pid: int) -> int | None:
    """How a process this one started ended (its exit status, or minus the signal); None when it was not our
    child (started by another run: its parent, not us, learnt how it ended) or has not ended."""
    _reap(pid)
    return _EXITED.get(pid)


def _reap(pid: int) -> None:
    # a child of ours that exited stays a zombie until waited for; through its Popen when we have it, so
    # that Popen knows it ended
    for process in _SPAWNED:
        if process.pid == pid:
            if process.poll() is not None:
                _SPAWNED.remove(process)
                _EXITED[pid] = process.returncode
            return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
