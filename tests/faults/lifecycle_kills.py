"""Hold ``manage_pod.py`` (or its watchdog) at one phase of a pod's life, kill it there, then act as the user
would (``--status``, then ``--shutdown``) and count what a user would pay for or trip over.

Holds are deterministic, never "sleep and hope": the fake RunPod holds a create before or after it makes the
pod, or a DELETE (``hold_creates``, ``hold_deletes``), or keeps a pod PROVISIONING or vLLM loading for minutes;
where nothing outside separates two steps, ``LLMPOD_HOLD_AT=<phase>`` stops manage_pod.py at its
``checkpoint(phase)`` (llmpod/pod/processes.py), which says ``holding at <phase>`` on stderr.

Counts (the ledger's failure keys): ``unrecorded_pods`` (right after the kill, a live pod that neither
``pod_state.json`` names nor ``--status`` lists as not recorded), ``pods_left_running`` (live pods after the
user's ``--shutdown``), ``leaked_processes``/``leaked_ports`` (helpers of the directory alive, the proxy port
listening, after it), ``dirty_errors`` (a traceback anywhere, an exit code README does not promise, a state
file ``--shutdown`` left behind).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmpod._files import atomic_write
from llmpod.pod import processes
from tests.support.e2e_harness import ROOT, FakeRunPod, Workdir, pid_alive, port_free
from tests.support.helpers import wait_until

TRACEBACK = "Traceback (most recent call last)"
# --status (and every other run) names each llmpod-* pod this directory does not know, like this:
LEAK_LINE = re.compile(r"warning: pod (\S+) \((\S+), \S+, \$[0-9.]+/h\) is not recorded in")
EXIT_ON = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130}  # README: 130 interrupted
SIGNAL_NAMES = {signal.SIGKILL: "SIGKILL", signal.SIGINT: "SIGINT"}


@dataclass
class Tally:
    """What went wrong in one or more injected faults, in the ledger's terms."""

    injected: int = 0
    pods_left_running: int = 0
    unrecorded_pods: int = 0
    leaked_processes: int = 0
    leaked_ports: int = 0
    dirty_errors: int = 0
    notes: list[str] = field(default_factory=list)

    def failures(self) -> dict[str, int]:
        return {
            "pods_left_running": self.pods_left_running,
            "unrecorded_pods": self.unrecorded_pods,
            "leaked_processes": self.leaked_processes,
            "leaked_ports": self.leaked_ports,
            "dirty_errors": self.dirty_errors,
        }

    def dirty(self, note: str) -> None:
        self.dirty_errors += 1
        self.notes.append(note)

    def check_run(self, what: str, returncode: int | None, output: str, expected: int | tuple[int, ...]) -> None:
        wanted = expected if isinstance(expected, tuple) else (expected,)
        if returncode not in wanted:
            self.dirty(f"{what} exited {returncode}, not {'/'.join(map(str, wanted))}: {_tail(output)}")
        if TRACEBACK in output:
            self.dirty(f"{what} printed a traceback: {_tail(output)}")


def _tail(text: str, limit: int = 300) -> str:
    return " | ".join(text.strip().splitlines()[-4:])[-limit:]


class Started:
    """manage_pod.py started in the background, its output in files (read while it runs)."""

    def __init__(self, work: Workdir, *args: str, env: dict[str, str] | None = None, label: str = "run") -> None:
        self.out_path = work.path / f".{label}.stdout"
        self.err_path = work.path / f".{label}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "manage_pod.py"), *args],
                cwd=work.path,
                env={**work.env, **(env or {})},
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def says(self, text: str) -> bool:
        return text in self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def live_pods(fake: FakeRunPod) -> list[dict[str, Any]]:
    """Every pod the fake has not terminated (by the fake's own view: works while the key is revoked)."""
    return [p for p in fake.state()["pods"] if not p["deleted"]]


def calls(fake: FakeRunPod, route: str) -> int:
    return int(fake.state()["calls"].get(route, 0))


def recorded(work: Workdir) -> dict[str, Any] | None:
    try:
        return json.loads(work.state_file.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def reported_leaks(output: str) -> set[str]:
    return {name for match in LEAK_LINE.finditer(output) for name in match.groups()}


def count_unrecorded(
    live: list[dict[str, Any]], state: dict[str, Any] | None, status_output: str, tally: Tally
) -> None:
    """A pod is accounted for if the state names it (by id; by name only while the id is not known yet) or
    ``--status`` lists it as not recorded."""
    leaks = reported_leaks(status_output)
    for pod in live:
        in_state = state is not None and (
            pod["id"] == state.get("pod_id") or (state.get("pod_id") is None and pod["name"] == state.get("pod_name"))
        )
        if not in_state and pod["id"] not in leaks and pod["name"] not in leaks:
            tally.unrecorded_pods += 1
            tally.notes.append(f"pod {pod['name']} ({pod['id']}) neither in pod_state.json nor listed by --status")


def user_checks(work: Workdir, fake: FakeRunPod, tally: Tally, *, status_exit: int = 0) -> None:
    """Right after a fault: what is live must be accounted for; then ``--status`` and ``--shutdown`` as a
    user runs them, and nothing may be left billing or running."""
    live, state = live_pods(fake), recorded(work)
    status = work.run("--status", timeout=120)
    tally.check_run("--status", status.returncode, status.stdout + status.stderr, status_exit)
    count_unrecorded(live, state, status.stderr, tally)
    shutdown_and_count(work, fake, tally)


def shutdown_and_count(work: Workdir, fake: FakeRunPod, tally: Tally) -> None:
    down = work.run("--shutdown", timeout=300)
    tally.check_run("--shutdown", down.returncode, down.stdout + down.stderr, 0)
    left = live_pods(fake)
    tally.pods_left_running += len(left)
    tally.notes += [f"pod {p['name']} ({p['id']}, {p['status']}) still live after --shutdown" for p in left]
    if work.state_file.exists():
        tally.dirty(f"--shutdown exited {down.returncode} but left pod_state.json")
    count_survivors(work, tally)


def count_survivors(work: Workdir, tally: Tally) -> None:
    """Helpers of this directory and the proxy port, a bounded while after the shutdown (a watchdog that ended
    the session exits a moment later); anything left is counted, then killed so the next test starts clean."""
    root = str(work.path.resolve())

    def survivors() -> list[int]:
        return [
            pid
            for marker in ("LLMPOD_PROXY_OF", "LLMPOD_WATCHDOG_OF")
            for pid in processes.find_by_environ(marker, root)
        ]

    try:
        wait_until(lambda: not survivors(), "helpers exited", timeout=10, interval=0.1)
    except AssertionError:
        left = {pid: processes.cmdline(pid) for pid in survivors()}
        tally.leaked_processes += len(left)
        tally.notes.append(f"processes outlived --shutdown: {left}")
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    try:
        wait_until(lambda: port_free(work.proxy_port), "proxy port free", timeout=10, interval=0.1)
    except AssertionError:
        tally.leaked_ports += 1
        tally.notes.append(f"proxy port {work.proxy_port} still listening after --shutdown")


def logs_clean(work: Workdir, tally: Tally) -> None:
    for log in (work.path / ".llmpod").glob("*.log"):
        text = log.read_text(errors="replace")
        if TRACEBACK in text:
            tally.dirty(f"{log.name} holds a traceback: {_tail(text.split(TRACEBACK, 1)[1])}")


def jump_past_expiry(work: Workdir) -> None:
    """The wall clock passes expires_at at once, as for a laptop that slept (rewritten as the product writes)."""
    state = json.loads(work.state_file.read_text())
    state["expires_at"] = time.time() - 60
    atomic_write(work.state_file, json.dumps(state).encode(), mode=0o600)


# ----------------------------------------------------------------------------------------------- the phases
@dataclass(frozen=True)
class Phase:
    """How to bring a run to one phase and hold it there, and how to let the held request go on afterwards.

    ``start`` returns the process to kill (manage_pod.py, its watchdog, or a manage_pod.py --shutdown) once
    the phase is reached; ``release`` (after the kill) lets whatever the fake held go on, as RunPod would
    finish a request whose client has gone, and waits until it has."""

    name: str
    target: str
    start: Callable[[Workdir, FakeRunPod], Started | int]
    release: Callable[[Workdir, FakeRunPod], None] = lambda work, fake: None


def _held_at(checkpoint: str) -> Callable[[Workdir, FakeRunPod], Started]:
    def start(work: Workdir, fake: FakeRunPod) -> Started:
        run = Started(work, env={"LLMPOD_HOLD_AT": checkpoint})
        wait_until(
            lambda: run.says(f"holding at {checkpoint}") or run.process.poll() is not None,
            f"manage_pod.py holding at {checkpoint}",
            timeout=90,
            interval=0.05,
        )
        return run

    return start


def _with_fake(
    switches: dict[str, Any], reached: Callable[[Workdir, FakeRunPod], bool], what: str
) -> Callable[[Workdir, FakeRunPod], Started]:
    def start(work: Workdir, fake: FakeRunPod) -> Started:
        fake.configure(**switches)
        run = Started(work)
        wait_until(lambda: reached(work, fake) or run.process.poll() is not None, what, timeout=90, interval=0.1)
        return run

    return start


def _state_phase(work: Workdir, phase: str) -> bool:
    state = recorded(work)
    return state is not None and state.get("phase") == phase and state.get("pod_id") is not None


def _pod_status(fake: FakeRunPod, status: str) -> bool:
    return any(p["status"] == status for p in live_pods(fake))


def _release_create(work: Workdir, fake: FakeRunPod) -> None:
    fake.configure(hold_creates="")
    # the held create goes on without its client: RunPod makes the pod anyway
    wait_until(lambda: len(fake.state()["pods"]) >= 1, "the held create made its pod", timeout=30, interval=0.1)


def _release_deletes(work: Workdir, fake: FakeRunPod) -> None:
    fake.configure(hold_deletes=False)
    wait_until(
        lambda: any(p["deleted"] for p in fake.state()["pods"]),
        "the held DELETE went through",
        timeout=30,
        interval=0.1,
    )


def _up(work: Workdir) -> None:
    up = work.run(timeout=120)
    assert up.returncode == 0, up.stderr  # the set-up, not the fault: a failure here is a plain test error


def _watchdog_running(work: Workdir, fake: FakeRunPod) -> int:
    _up(work)
    log = work.path / ".llmpod" / "watchdog.log"
    wait_until(lambda: log.exists() and "started" in log.read_text(), "watchdog started", timeout=30, interval=0.1)
    pid = work.pid("watchdog")
    assert pid is not None and pid_alive(pid)
    return pid


def _watchdog_expiring(work: Workdir, fake: FakeRunPod) -> int:
    pid = _watchdog_running(work, fake)
    pod_id = recorded(work)["pod_id"]  # type: ignore[index]
    fake.configure(hold_deletes=True)
    jump_past_expiry(work)
    wait_until(
        lambda: calls(fake, "DELETE /v2/pods/{pod_id}") >= 1,
        f"the watchdog's DELETE of {pod_id} sent",
        timeout=30,
        interval=0.1,
    )
    return pid


def _shutdown_deleting(work: Workdir, fake: FakeRunPod) -> Started:
    _up(work)
    fake.configure(hold_deletes=True)
    run = Started(work, "--shutdown", label="shutdown")
    wait_until(
        lambda: calls(fake, "DELETE /v2/pods/{pod_id}") >= 1 or run.process.poll() is not None,
        "--shutdown's DELETE sent",
        timeout=60,
        interval=0.1,
    )
    return run


def _shutdown_held(work: Workdir, fake: FakeRunPod) -> Started:
    _up(work)
    run = Started(work, "--shutdown", env={"LLMPOD_HOLD_AT": "terminating"}, label="shutdown")
    wait_until(
        lambda: run.says("holding at terminating") or run.process.poll() is not None,
        "--shutdown holding before its DELETE",
        timeout=60,
        interval=0.05,
    )
    return run


def _watchdog_finishes(work: Workdir, fake: FakeRunPod) -> None:
    # nobody else will terminate the pod until the user comes back: the watchdog, still running, must
    wait_until(
        lambda: not work.state_file.exists() and not live_pods(fake),
        "the watchdog finished the interrupted shutdown",
        timeout=60,
        interval=0.1,
    )


PHASES: dict[str, Phase] = {
    p.name: p
    for p in [
        Phase("config loaded", "manage_pod.py", _held_at("config loaded")),
        Phase("intent written", "manage_pod.py", _held_at("intent written")),
        Phase(
            "create sent, no pod yet",
            "manage_pod.py",
            _with_fake({"hold_creates": "before_pod"}, lambda w, f: calls(f, "POST /v2/pods") >= 1, "create sent"),
            _release_create,
        ),
        Phase(
            "create sent, pod made, no answer",
            "manage_pod.py",
            _with_fake({"hold_creates": "after_pod"}, lambda w, f: len(f.state()["pods"]) >= 1, "pod made"),
            lambda work, fake: fake.configure(hold_creates=""),
        ),
        Phase("create answered, id not saved", "manage_pod.py", _held_at("create answered")),
        Phase(
            "waiting for RUNNING",
            "manage_pod.py",
            _with_fake({"provisioning_seconds": 300}, lambda w, f: _state_phase(w, "waiting"), "waiting"),
        ),
        Phase(
            "waiting for vLLM health",
            "manage_pod.py",
            _with_fake(
                {"hold_vllm": True},
                lambda w, f: (
                    _state_phase(w, "waiting") and _pod_status(f, "RUNNING") and calls(f, "PROXY GET /health") >= 1
                ),
                "polling vLLM",
            ),
            lambda work, fake: fake.configure(hold_vllm=False),
        ),
        Phase("proxy starting", "manage_pod.py", _held_at("proxy starting")),
        Phase("ready", "manage_pod.py", _held_at("ready")),
        Phase("checking the pod", "watchdog", _watchdog_running),
        Phase("terminating an expired pod", "watchdog", _watchdog_expiring, _release_deletes),
        Phase("terminating, DELETE sent", "manage_pod.py --shutdown", _shutdown_deleting, _release_deletes),
        Phase("terminating, before the DELETE", "manage_pod.py --shutdown", _shutdown_held, _watchdog_finishes),
    ]
}


def kill_at(work: Workdir, fake: FakeRunPod, phase: Phase, sig: signal.Signals) -> Tally:
    """One fault: hold at ``phase``, send ``sig``, let the fake's held request go on, then the user's checks."""
    tally = Tally(injected=1)
    target = phase.start(work, fake)
    try:
        if isinstance(target, Started):
            if target.process.poll() is not None:
                raise AssertionError(f"manage_pod.py ended before reaching {phase.name!r}: {_tail(target.output())}")
            target.process.send_signal(sig)
            if sig == signal.SIGINT:
                # the interrupt is taken once it exits or says it is terminating the pod (perhaps still waiting on
                # what the fake holds): only then does the held request go on
                wait_until(
                    lambda: target.process.poll() is not None or target.says("terminating pod"),
                    "the interrupt taken",
                    timeout=30,
                    interval=0.05,
                )
            phase.release(work, fake)
            code = target.wait(timeout=300)
            tally.check_run(
                f"{phase.target} ({SIGNAL_NAMES[sig]} while {phase.name})", code, target.output(), EXIT_ON[sig]
            )
        else:
            os.kill(target, sig)
            phase.release(work, fake)
            wait_until(lambda: not pid_alive(target), "the watchdog ended", timeout=60, interval=0.1)
    finally:
        if isinstance(target, Started):
            target.stop()
    user_checks(work, fake, tally)
    logs_clean(work, tally)
    return tally
