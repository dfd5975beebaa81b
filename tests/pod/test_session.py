"""The lifecycle's decisions, in-process over the in-memory provider and a fake clock (milliseconds each).

GPU failover (no capacity, a 403 pool, max_hourly_cost), a create that answers 5xx or times out though the pod
exists, terminate-and-verify with its retries and its loud failure (exit 4), crash loops (one line, the pod
terminated), the ready timeout, reuse and replacement. The process tests keep what only processes show (signals,
kill -9, ports, leaks, exit codes end to end: tests/pod/test_manage_pod_e2e.py, tests/faults/test_cost_safety.py).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from llmpod.errors import CleanupFailedError, CrashLoopError, ForeignPodError, PodError
from llmpod.pod import cli
from llmpod.pod.lifecycle import TERMINATE_DEADLINE
from llmpod.pod.state import load_state, save_state
from tests.fakes.fake_provider import FakeClock, FakeProvider
from tests.fakes.fake_session import A6000, L40S, Rig, make_session
from tests.support.e2e_harness import vllm_crash_lines

BILLED = re.compile(r"\(terminated after (\d+)s, (?:about \$\d+\.\d\d|under \$0\.01) billed\)$")


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    return make_session(tmp_path, monkeypatch)


def last_session(rig: Rig) -> dict[str, object]:
    data: dict[str, object] = json.loads(rig.session.paths.last_session.read_text())
    return data


# ------------------------------------------------------------------------------------------------ failover
def test_no_capacity_on_the_first_gpu_moves_on_to_the_next(rig: Rig) -> None:
    rig.provider.no_capacity = {A6000}
    state = rig.session._create()
    assert state.phase == "ready" and state.gpu_type_id == L40S
    assert rig.provider.calls["create"] == 2 and rig.provider.live() == [state.pod_id]


def test_no_capacity_anywhere_creates_nothing_and_says_runpods_words(rig: Rig) -> None:
    rig.provider.no_capacity = {A6000, L40S}
    with pytest.raises(PodError) as caught:
        rig.session._create()
    message = str(caught.value)
    assert message.startswith(f"no GPU could be had: {A6000}: There are no longer any instances available")
    assert f"{L40S}: There are no longer" in message and "\n" not in message and caught.value.exit_code == 1
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None


def test_a_403_pool_is_skipped_and_the_user_told(rig: Rig) -> None:
    rig.provider.forbidden = {A6000}
    state = rig.session._create()
    assert state.gpu_type_id == L40S and rig.provider.live() == [state.pod_id]
    assert f"{A6000}: RunPod answered 403, this account has no access to that GPU pool" in rig.text


def test_a_gpu_over_max_hourly_cost_is_terminated_and_the_next_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_session(tmp_path, monkeypatch, max_hourly_cost=0.6)
    rig.provider.cost_per_hour = {A6000: 0.79, L40S: 0.5}
    state = rig.session._create()
    assert state.gpu_type_id == L40S and state.cost_per_hour == 0.5
    assert rig.provider.calls["create"] == 2 and rig.provider.live() == [state.pod_id]
    assert f"{A6000} costs $0.79/h, over max_hourly_cost: trying the next GPU type" in rig.text


def test_every_gpu_over_max_hourly_cost_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_session(tmp_path, monkeypatch, max_hourly_cost=0.1)
    with pytest.raises(
        PodError,
        match=r"^no GPU could be had: NVIDIA RTX A6000: \$0\.50/h is over max_hourly_cost; "
        r"NVIDIA L40S: \$0\.50/h is over max_hourly_cost$",
    ):
        rig.session._create()
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None


# ------------------------------------------------------------------------------------------------ create
def test_a_create_that_answers_5xx_but_made_the_pod_is_found_by_name(rig: Rig) -> None:
    rig.provider.create_5xx_made = 1
    state = rig.session._create()
    assert rig.provider.calls["create"] == 1 and rig.provider.live() == [state.pod_id]


def test_a_create_that_answers_5xx_and_made_nothing_is_retried(rig: Rig) -> None:
    rig.provider.create_5xx_nothing = 2
    state = rig.session._create()
    assert rig.provider.calls["create"] == 3 and rig.provider.live() == [state.pod_id]
    assert state.gpu_type_id == A6000  # a 5xx is no reason to leave the GPU the user asked for first


def test_a_create_that_timed_out_is_watched_for_when_interrupted(rig: Rig) -> None:
    """The create never answered, then Ctrl-C: its pod appears 20 s later, and is found and terminated."""
    rig.provider.create_timeout_made_after = 20.0
    interrupted: list[float] = []

    def ctrl_c_once(seconds: float) -> None:
        if not interrupted:
            interrupted.append(seconds)
            raise KeyboardInterrupt
        rig.clock.sleep(seconds)

    rig.session.sleep = ctrl_c_once
    with pytest.raises(KeyboardInterrupt):
        rig.session._create()
    assert rig.provider.calls["create"] == 1 and rig.provider.calls["terminate"] >= 1
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None
    assert "was never answered: watching for that pod" in rig.text


# ------------------------------------------------------------------------------------------------ terminate
def test_terminate_is_retried_until_the_pod_is_gone(rig: Rig) -> None:
    state = rig.session._create()
    assert state.pod_id is not None
    rig.provider.terminate_failures = 2
    rig.session._terminate_verified(state.pod_id)
    assert rig.provider.calls["terminate"] == 3 and rig.provider.live() == []


@pytest.mark.parametrize("how", ["errors", "ignored"])
def test_a_pod_never_confirmed_gone_is_exit_4(rig: Rig, how: str) -> None:
    state = rig.session._create()
    assert state.pod_id is not None
    if how == "errors":
        rig.provider.terminate_failures = 10_000
    else:
        rig.provider.terminate_ignored = True
    started = rig.clock.time()
    with pytest.raises(CleanupFailedError) as caught:
        rig.session._terminate_verified(state.pod_id)
    assert caught.value.exit_code == 4 and rig.clock.time() - started >= TERMINATE_DEADLINE
    message = str(caught.value)
    assert f"pod {state.pod_id} could not be confirmed terminated" in message and "console.runpod.io" in message
    assert ("HTTP 500" in message) == (how == "errors")


def test_shutdown_terminates_and_forgets(rig: Rig) -> None:
    state = rig.session._create()
    result = rig.session.shutdown()
    assert result.terminated == [state.pod_id] and result.had_state is True
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None
    assert rig.session.shutdown().terminated == []  # idempotent


def test_shutdown_all_removes_leaked_pods_too(rig: Rig) -> None:
    leaked = rig.provider.add_pod("llmpod-leaked01")
    foreign = rig.provider.add_pod("someone-elses")
    state = rig.session._create()
    assert [p.id for p in rig.session.report_leaks(load_state(rig.session.paths))] == [leaked.id]
    assert "llmpod-leaked01" in rig.text and "--shutdown --all" in rig.text
    result = rig.session.shutdown(all_ours=True)
    assert set(result.terminated) == {state.pod_id, leaked.id}
    assert rig.provider.live() == [foreign.id]


def test_shutdown_refuses_a_recorded_pod_id_that_names_another_pod(rig: Rig) -> None:
    """A hand-edited or stale pod_state.json whose pod_id is another pod's: one line, and nothing terminated."""
    state = rig.session._create()
    foreign = rig.provider.add_pod("someone-elses")
    state.pod_id = foreign.id
    save_state(rig.session.paths, state)
    with pytest.raises(ForeignPodError) as caught:
        rig.session.shutdown()
    message = str(caught.value)
    assert "\n" not in message and foreign.id in message and "someone-elses" in message and state.pod_name in message
    assert foreign.id in rig.provider.live() and rig.provider.calls["terminate"] == 0
    recorded = load_state(rig.session.paths)
    assert recorded is not None and recorded.phase == "ready"  # not left "terminating" for the watchdog to finish


def test_shutdown_while_the_recorded_id_cannot_be_checked_goes_by_the_recorded_name(rig: Rig) -> None:
    """RunPod failing the name check must not let a foreign pod_id through: our pod (found by its unique name)
    is terminated, the other is not touched."""
    state = rig.session._create()
    ours = state.pod_id
    foreign = rig.provider.add_pod("someone-elses")
    state.pod_id = foreign.id
    save_state(rig.session.paths, state)
    rig.provider.get_failures = 1
    result = rig.session.shutdown()
    assert result.terminated == [ours]
    assert rig.provider.live() == [foreign.id]


def test_shutdown_all_forgets_a_foreign_record_and_removes_our_pods(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    state = rig.session._create()
    foreign = rig.provider.add_pod("someone-elses")
    state.pod_id = foreign.id
    save_state(rig.session.paths, state)
    assert cli.cmd_shutdown(rig.session, argparse.Namespace(all=True)) == 0
    assert rig.provider.live() == [foreign.id] and load_state(rig.session.paths) is None
    assert "forgot" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ start-up
def test_a_crash_looping_pod_is_terminated_with_the_line_that_explains_it(rig: Rig) -> None:
    rig.provider.crash_lines, rig.provider.crash_every = vllm_crash_lines("cuda_oom"), 3.0
    with pytest.raises(CrashLoopError) as caught:
        rig.session._create()
    line = str(caught.value)
    assert "\n" not in line and line.startswith("pod llmpod-")
    assert " crash-loops: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 270.00 MiB." in line
    billed = BILLED.search(line)
    assert billed is not None and int(billed.group(1)) < 180, line  # a few minutes at most
    assert "Traceback (most recent call last)" not in line
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None
    assert "crash-loops" in str(last_session(rig)["reason"])


def test_a_local_pod_that_exits_at_start_is_not_waited_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = FakeProvider(
        FakeClock(),
        kind="local",
        gpu_failover=False,
        reads_crash_loops=False,
        shows_start_log=False,
        create_may_land_late=False,
        exits_at_start=True,
        crash_lines=["mock_vllm_server.py: error: unrecognized arguments: --no-such-flag"],
    )
    rig = make_session(tmp_path, monkeypatch, provider)
    with pytest.raises(CrashLoopError, match=r"exited at start \(EXITED\): mock_vllm_server.py: error: unrecog"):
        rig.session._create()
    assert rig.clock.time() - FakeClock().time() < 5  # not ready_timeout_seconds
    assert provider.live() == []


def test_the_ready_timeout_terminates_the_pod_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_session(tmp_path, monkeypatch, ready_timeout_seconds=30)
    rig.provider.ready_seconds = 3600
    with pytest.raises(PodError, match="was not ready within ready_timeout_seconds=30"):
        rig.session._create()
    assert rig.provider.live() == [] and load_state(rig.session.paths) is None


def test_a_pod_that_disappears_while_starting_is_reported(rig: Rig) -> None:
    rig.provider.starting_seconds = 60
    real_sleep = rig.session.sleep

    def reclaim_then_sleep(seconds: float) -> None:
        rig.provider.pods.clear()
        real_sleep(seconds)

    rig.session.sleep = reclaim_then_sleep
    with pytest.raises(PodError, match=r"stopped while starting \(gone\)"):
        rig.session._create()
    assert load_state(rig.session.paths) is None


# ------------------------------------------------------------------------------------------------ up
def test_up_reuses_a_ready_pod_and_replaces_a_dead_one(rig: Rig) -> None:
    first = rig.session.up()
    assert rig.sidecars.asked == ["ensure_proxy", "ensure_watchdog"]
    again = rig.session.up()
    assert again.pod_id == first.pod_id and rig.provider.calls["create"] == 1 and "reusing pod" in rig.text
    assert first.pod_id is not None
    rig.provider.reclaim(first.pod_id)
    replaced = rig.session.up()
    assert replaced.pod_id != first.pod_id and rig.provider.live() == [replaced.pod_id]
    assert "no longer exists" in rig.text


def test_up_after_the_expiry_terminates_and_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_session(tmp_path, monkeypatch, runtime_seconds=600)
    first = rig.session.up()
    rig.clock.advance(601)
    second = rig.session.up()
    assert second.pod_id != first.pod_id and rig.provider.live() == [second.pod_id]
    assert "passed its expiry: terminating it" in rig.text
