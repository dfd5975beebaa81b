"""Cost safety: no pod is left billing, and none is ever left without a trace, whatever kills manage_pod.py.

Every phase of a pod's life (config loaded … ready, the watchdog running or terminating, a --shutdown
terminating) is held deterministically (tests/faults/lifecycle_kills.py), killed with SIGKILL and with SIGINT,
and followed by what a user does: ``--status``, then ``--shutdown``. Then RunPod's own faults: a create that
answers 500 or times out though the pod exists, DELETEs that fail, a pod RunPod reclaims, a key revoked
mid-session, a clock that jumps past the expiry, two runs at once. Each test records its counts in the fault
ledger (area "cost safety"). The full matrix is soak-marked (``python3 -m tests.faults`` runs it); the default
run has three kills (a held create, a loading vLLM, the watchdog's held DELETE) and the cheap special cases.
"""

from __future__ import annotations

import re
import signal

import httpx
import pytest

from tests.faults.ledger import FaultLedger
from tests.faults.lifecycle_kills import (
    PHASES,
    SIGNAL_NAMES,
    Started,
    Tally,
    calls,
    count_unrecorded,
    jump_past_expiry,
    kill_at,
    live_pods,
    logs_clean,
    recorded,
    shutdown_and_count,
    user_checks,
)
from tests.support.e2e_harness import FakeRunPod, Workdir, vllm_crash_lines
from tests.support.helpers import wait_until

pytestmark = pytest.mark.slow
AREA = "cost safety"

# the default run keeps the two kills that cost most if mishandled; the whole phase x signal matrix is soak
# (the watchdog's expiry and idle decisions are tests/pod/test_watchdog.py's, in-process; its process ending an idle
# session is tests/pod/test_manage_pod_e2e.py's)
DEFAULT_RUN = {("create sent, no pod yet", signal.SIGINT), ("waiting for vLLM health", signal.SIGINT)}
MATRIX = [
    pytest.param(
        name,
        sig,
        id=f"{SIGNAL_NAMES[sig]}-{name.replace(' ', '_').replace(',', '')}",
        marks=() if (name, sig) in DEFAULT_RUN else (pytest.mark.soak,),
    )
    for name in PHASES
    for sig in (signal.SIGKILL, signal.SIGINT)
]


def record(ledger: FaultLedger, kind: str, tally: Tally) -> None:
    ledger.record(AREA, kind, injected=tally.injected, notes=tally.notes, **tally.failures())


@pytest.mark.parametrize(("phase", "sig"), MATRIX)
def test_kill_at_each_phase(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger, phase: str, sig: signal.Signals
) -> None:
    """Hold at ``phase``, kill with ``sig``, then --status and --shutdown as the user would."""
    held = PHASES[phase]
    tally = kill_at(workdir, fake_runpod, held, sig)
    record(fault_ledger, f"{SIGNAL_NAMES[sig]} {held.target} while {phase}", tally)


# ------------------------------------------------------------------------------------- RunPod's own faults
# in the default run in-process: tests/pod/test_session.py (a 5xx create that made its pod is found by name)
@pytest.mark.soak
def test_create_answers_500_but_the_pod_exists(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger
) -> None:
    fake_runpod.configure(create_500_after_create=1)
    tally = Tally(injected=1)
    up = workdir.run()
    tally.check_run("manage_pod.py", up.returncode, up.stdout + up.stderr, 0)
    if fake_runpod.creates() != 1 or len(live_pods(fake_runpod)) != 1:
        tally.pods_left_running += max(0, len(live_pods(fake_runpod)) - 1)
        tally.notes.append(f"{fake_runpod.creates()} creates, {len(live_pods(fake_runpod))} pods for one request")
    user_checks(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, "create answers 500 though RunPod made the pod", tally)


@pytest.mark.soak
def test_create_times_out_and_runpod_makes_the_pod_later(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger
) -> None:
    """The create never answers (our client gives up after 30 s) and no pod is found by name, so the create is
    retried; then RunPod makes both. The second is recorded by id; the first, with the same name, must be
    listed as not recorded and removed by a plain --shutdown."""
    fake_runpod.configure(hold_creates="before_pod")
    tally = Tally(injected=1)
    run = Started(workdir)
    try:
        wait_until(
            lambda: calls(fake_runpod, "POST /v2/pods") >= 2 or run.process.poll() is not None,
            "manage_pod.py gave up on the create and sent it again",
            timeout=150,
            interval=0.2,
        )
        fake_runpod.configure(hold_creates="")
        tally.check_run("manage_pod.py", run.wait(timeout=120), run.output(), 0)
    finally:
        run.stop()
    if len(fake_runpod.state()["pods"]) != 2:
        tally.dirty(f"the fault did not happen as planned: {len(fake_runpod.state()['pods'])} pods made, not 2")
    user_checks(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, "create times out; RunPod makes the pod later", tally)


def test_a_gpu_pool_answers_403(workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger) -> None:
    """The spec's create table: a 403 is a pool this account cannot use: skip that GPU type and go on. Then every
    pool refuses: one line, exit 1, nothing created."""
    fake_runpod.configure(forbidden_gpu_ids=["NVIDIA RTX A6000"])
    tally = Tally(injected=2)
    up = workdir.run()
    tally.check_run("manage_pod.py with the first GPU's pool closed", up.returncode, up.stdout + up.stderr, 0)
    state = recorded(workdir) or {}
    if state.get("gpu_type_id") != "NVIDIA L40S" or len(live_pods(fake_runpod)) != 1:
        tally.pods_left_running += max(0, len(live_pods(fake_runpod)) - 1)
        tally.dirty(
            f"not one pod on the next GPU type: {state.get('gpu_type_id')}, {len(live_pods(fake_runpod))} live pods"
        )
    user_checks(workdir, fake_runpod, tally)
    fake_runpod.configure(forbidden_gpu_ids=["NVIDIA RTX A6000", "NVIDIA L40S"])
    refused = workdir.run()
    tally.check_run("manage_pod.py with every pool closed", refused.returncode, refused.stdout + refused.stderr, 1)
    if len(refused.stderr.strip().splitlines()[-1:]) != 1 or "403" not in refused.stderr.strip().splitlines()[-1]:
        tally.dirty(f"every pool closed: the last line does not say why: {refused.stderr.strip()[-200:]}")
    tally.pods_left_running += len(live_pods(fake_runpod))
    if recorded(workdir) is not None:
        tally.dirty("every pool closed: pod_state.json left behind though nothing was created")
    user_checks(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, "create answers 403 on a GPU pool (no access), then on every pool", tally)


# in the default run in-process: tests/pod/test_session.py (terminate retried until the pod is gone)
@pytest.mark.soak
def test_delete_answers_500_twice_then_works(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger
) -> None:
    assert workdir.run().returncode == 0
    fake_runpod.configure(delete_500_next=2)
    tally = Tally(injected=2)
    user_checks(workdir, fake_runpod, tally)
    if fake_runpod.state()["settings"]["delete_500_next"] != 0:
        tally.dirty("the failing DELETEs were never tried: the fault did not happen")
    record(fault_ledger, "DELETE answers 500 twice, then works", tally)


@pytest.mark.soak  # the default run stays under 5 minutes: tests/faults is run whole by python3 -m tests.faults
def test_pod_reclaimed_by_runpod(workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger) -> None:
    assert workdir.run().returncode == 0
    pod_id = workdir.state()["pod_id"]
    httpx.post(f"{fake_runpod.url}/fake/pods/{pod_id}/vanish", timeout=5).raise_for_status()
    tally = Tally(injected=1)
    wait_until(lambda: not workdir.state_file.exists(), "the watchdog noticed the pod is gone", timeout=30)
    status = workdir.run("--status")
    tally.check_run("--status", status.returncode, status.stdout + status.stderr, 0)
    if "disappeared" not in status.stdout:
        tally.dirty(f"--status does not say the pod disappeared: {status.stdout.strip()[:200]}")
    shutdown_and_count(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, "the pod disappears on its own (RunPod reclaimed it)", tally)


@pytest.mark.soak  # the default run stays under 5 minutes: tests/faults is run whole by python3 -m tests.faults
def test_key_revoked_mid_session(workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger) -> None:
    """401 on every call from mid-session: nothing can be terminated until the user fixes the key, so the pod
    must stay recorded (and reported as such), every command must end in one line and exit 2, and the
    expiry must still be carried out once the key works again."""
    assert workdir.run().returncode == 0
    pod_id = workdir.state()["pod_id"]
    fake_runpod.configure(revoked=True)
    jump_past_expiry(workdir)  # the watchdog now must terminate, and cannot
    tally = Tally(injected=1)
    log = workdir.path / ".llmpod" / "watchdog.log"
    wait_until(lambda: "refused the API key" in log.read_text(), "the watchdog met the 401", timeout=30)
    live, state = live_pods(fake_runpod), recorded(workdir)
    for command in ("--status", "--shutdown"):
        refused = workdir.run(command)
        tally.check_run(f"{command} with a revoked key", refused.returncode, refused.stdout + refused.stderr, 2)
        if len(refused.stderr.strip().splitlines()) != 1:
            tally.dirty(f"{command} with a revoked key: not one clear line: {refused.stderr.strip()[:200]}")
    count_unrecorded(live, recorded(workdir), "", tally)
    if recorded(workdir) is None or state is None or recorded(workdir)["pod_id"] != pod_id:  # type: ignore[index]
        tally.unrecorded_pods += 1
        tally.notes.append("the pod's record was dropped while nothing could terminate it")
    fake_runpod.configure(revoked=False)  # the user puts a working key back
    shutdown_and_count(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, "RunPod key revoked mid-session (401)", tally)


@pytest.mark.soak
def test_clock_jumps_past_expiry(workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger) -> None:
    """A laptop that slept past the expiry: to the watchdog, the wall clock is suddenly past expires_at."""
    assert workdir.run().returncode == 0
    jump_past_expiry(workdir)
    tally = Tally(injected=1)
    wait_until(lambda: not workdir.state_file.exists(), "the watchdog noticed the expiry", timeout=30)
    if live_pods(fake_runpod):
        tally.pods_left_running += len(live_pods(fake_runpod))
        tally.notes.append("the watchdog cleared the state of an expired pod it did not terminate")
    status = workdir.run("--status")
    tally.check_run("--status", status.returncode, status.stdout + status.stderr, 0)
    if "expired" not in status.stdout:
        tally.dirty(f"--status does not say the session expired: {status.stdout.strip()[:200]}")
    shutdown_and_count(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, "the clock jumps past the expiry (laptop slept)", tally)


def test_two_runs_at_once_create_one_pod(workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger) -> None:
    first, second = Started(workdir, label="first"), Started(workdir, label="second")
    tally = Tally(injected=1)
    try:
        for name, run in (("first", first), ("second", second)):
            tally.check_run(f"the {name} manage_pod.py", run.wait(timeout=180), run.output(), 0)
    finally:
        first.stop()
        second.stop()
    if fake_runpod.creates() != 1:
        tally.pods_left_running += max(0, len(live_pods(fake_runpod)) - 1)
        tally.notes.append(f"two runs at once made {fake_runpod.creates()} create calls")
    user_checks(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, "two manage_pod.py started at the same moment", tally)


@pytest.mark.parametrize(
    "phase",
    [
        pytest.param("create sent, pod made, no answer", marks=pytest.mark.soak),
        "waiting for vLLM health",
        pytest.param("ready", marks=pytest.mark.soak),
    ],
)
def test_sigkill_then_the_next_run_adopts_the_pod(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger, phase: str
) -> None:
    """The user's other way out of a killed run: run manage_pod.py again. It adopts (or replaces) the pod,
    never adding a second one, and its endpoint answers."""
    held = PHASES[phase]
    tally = Tally(injected=1)
    run = held.start(workdir, fake_runpod)
    assert isinstance(run, Started)
    try:
        run.process.kill()
        run.wait(timeout=30)
        held.release(workdir, fake_runpod)
    finally:
        run.stop()
    again = workdir.run()
    tally.check_run("manage_pod.py run again", again.returncode, again.stdout + again.stderr, 0)
    if ("reusing pod" if phase == "ready" else "previous run") not in again.stderr:
        tally.dirty(f"the next run did not say it adopted the pod: {again.stderr.strip()[-200:]}")
    if len(live_pods(fake_runpod)) != 1:
        tally.pods_left_running += abs(len(live_pods(fake_runpod)) - 1)
        tally.notes.append(f"{len(live_pods(fake_runpod))} live pods after the next run, not 1")
    try:
        answered = workdir.chat().status_code == 200
    except httpx.HTTPError:
        answered = False
    if not answered:
        tally.dirty("the adopted pod's endpoint does not answer")
    user_checks(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, f"SIGKILL manage_pod.py while {phase}, then run it again", tally)


# ------------------------------------------------------------------------ a container that dies at every start
# RunPod restarts it: the pod reads RUNNING and bills while vLLM never answers. ready_timeout_seconds is set far
# past the run's own 120 s, so waiting for it (as before crash loops were recognised) fails the test.
CRASH_LOOPS = {
    "a container crash-loops (gated model, no HF token)": (
        lambda: {"crash_loop": vllm_crash_lines("gated_model_no_token"), "crash_after_seconds": 3},
        "Access to model meta-llama/Llama-3.1-8B-Instruct is restricted",
    ),
    "CUDA mismatch: the vLLM 0.33 image on a host whose driver runs CUDA 12.4": (
        lambda: {"host_cuda": "12.4"},
        "unsatisfied condition: cuda>=13.0",
    ),
}
CRASH_BILLED_LIMIT = 180  # seconds a crash-looping pod may bill before it is terminated: "a few minutes"


@pytest.mark.parametrize("kind", list(CRASH_LOOPS))
def test_a_container_that_never_starts_is_given_up_on(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger, kind: str
) -> None:
    """Exit 1 with one line quoting the log line that says why, the pod terminated, within minutes of billing."""
    switches, says = CRASH_LOOPS[kind]
    fake_runpod.configure(**switches())
    workdir.write_config(ready_timeout_seconds=900)
    tally = Tally(injected=1)
    up = workdir.run()
    tally.check_run("manage_pod.py", up.returncode, up.stdout + up.stderr, 1)
    last = (up.stderr.strip().splitlines() or [""])[-1]
    billed = re.search(r"crash-loops: .* \(terminated after (\d+)s, .* billed\)$", last)
    if says not in last or billed is None:
        tally.dirty(f"not one line quoting the log line that explains it: {last[:300]}")
    elif int(billed.group(1)) > CRASH_BILLED_LIMIT:
        tally.dirty(f"billed {billed.group(1)} s before it was terminated (limit {CRASH_BILLED_LIMIT} s)")
    else:
        tally.notes.append(f"terminated after {billed.group(1)} s of billing")
    user_checks(workdir, fake_runpod, tally)
    logs_clean(workdir, tally)
    record(fault_ledger, kind, tally)
