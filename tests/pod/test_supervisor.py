"""The supervisor's round decisions (issue 18), in-process with a fake world and the fake clock: restarts with
backoff under each policy, ``down`` with the reason past max_restarts, a stopped model left alone, every state
change published as it happens."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llmpod.backends import Lifecycle
from llmpod.pod.models_config import ModelSpec
from llmpod.pod.supervisor import ModelRecord, Supervisor, backoff, describe_exit
from tests.fakes.fake_provider import FakeClock


@dataclass
class FakeOps:
    """Processes that live until a test kills them; a server ready as soon as it runs (unless told not)."""

    clock: FakeClock
    running: set[int] = field(default_factory=set)
    exits: dict[int, int] = field(default_factory=dict)
    ready_ok: bool = True
    next_pid: int = 100
    published: list[tuple[str, Lifecycle, int, str | None]] = field(default_factory=list)
    spawned: list[str] = field(default_factory=list)

    def alive(self, record: ModelRecord) -> bool:
        return record.pid in self.running

    def exit_status(self, pid: int) -> int | None:
        return self.exits.get(pid)

    def ready(self, spec: ModelSpec) -> bool:
        return self.ready_ok

    def last_line(self, spec: ModelSpec) -> str:
        return "RuntimeError: CUDA out of memory"

    def spawn(self, spec: ModelSpec) -> int:
        self.next_pid += 1
        self.running.add(self.next_pid)
        self.spawned.append(spec.id)
        return self.next_pid

    def stop(self, record: ModelRecord) -> bool:
        self.running.discard(record.pid or -1)
        return True

    def publish(self, spec: ModelSpec, record: ModelRecord) -> None:
        entry = (record.id, record.state, len(record.restart_times), record.last_error)
        if not self.published or self.published[-1] != entry:
            self.published.append(entry)

    def kill(self, record: ModelRecord, status: int = -9) -> None:
        assert record.pid is not None
        self.running.discard(record.pid)
        self.exits[record.pid] = status


def spec(model_id: str = "chat", **more: object) -> ModelSpec:
    return ModelSpec(id=model_id, kind="local", base_url="http://127.0.0.1:8001/v1", argv=("serve",), **more)  # type: ignore[arg-type]


def rig(**more: object) -> tuple[Supervisor, FakeOps, FakeClock, ModelRecord]:
    clock = FakeClock()
    ops = FakeOps(clock)
    supervisor = Supervisor((spec(**more),), ops, clock)
    record = ModelRecord(id="chat", kind="local")
    supervisor.start(record)
    supervisor.round({"chat": record})
    assert record.state == "healthy"
    return supervisor, ops, clock, record


def rounds(supervisor: Supervisor, clock: FakeClock, record: ModelRecord, seconds: float, step: float = 0.5) -> None:
    for _ in range(int(seconds / step)):
        supervisor.round({record.id: record})
        clock.advance(step)


def test_a_dead_process_is_restarted_with_backoff_then_healthy() -> None:
    supervisor, ops, clock, record = rig()
    ops.kill(record)
    supervisor.round({"chat": record})
    assert (record.state, len(record.restart_times), record.pid) == ("restarting", 1, None)
    assert record.last_error == "killed by SIGKILL: RuntimeError: CUDA out of memory"
    clock.advance(backoff(1) / 2)
    supervisor.round({"chat": record})
    assert record.pid is None  # still waiting out the backoff
    clock.advance(backoff(1))
    supervisor.round({"chat": record})  # a new process ...
    assert record.pid is not None and record.state == "restarting"
    supervisor.round({"chat": record})  # ... that answers
    assert record.state == "healthy"
    states = [(s, n) for _, s, n, _ in ops.published]
    assert states == [("starting", 0), ("healthy", 0), ("restarting", 1), ("healthy", 1)]


def test_past_max_restarts_in_the_window_it_is_down_with_the_reason() -> None:
    supervisor, ops, clock, record = rig(max_restarts=2, restart_window_seconds=600)
    delays = []
    for _ in range(2):
        ops.kill(record)
        supervisor.round({"chat": record})
        assert record.next_restart_at is not None
        delays.append(record.next_restart_at - clock.time())
        rounds(supervisor, clock, record, 10)
        assert record.state == "healthy"
    assert delays == [backoff(1), backoff(2)] == [1.0, 2.0]  # exponential
    ops.kill(record, status=3)
    supervisor.round({"chat": record})
    assert record.state == "down"
    assert record.last_error == (
        "exited with status 3: RuntimeError: CUDA out of memory (restarted 2 times in 600s: max_restarts reached)"
    )
    rounds(supervisor, clock, record, 30)
    assert ops.spawned.count("chat") == 3 and record.state == "down"  # never started again by itself


def test_restarts_outside_the_window_do_not_count() -> None:
    supervisor, ops, clock, record = rig(max_restarts=1, restart_window_seconds=60)
    ops.kill(record)
    rounds(supervisor, clock, record, 5)
    assert record.state == "healthy"
    clock.advance(61)
    ops.kill(record)
    supervisor.round({"chat": record})
    assert (record.state, len(record.restart_times)) == ("restarting", 1)


@pytest.mark.parametrize(
    ("policy", "status", "expected"),
    [
        ("never", -9, "down"),
        ("on-failure", 0, "down"),  # a clean exit is not a failure
        ("on-failure", 1, "restarting"),
        ("on-failure", None, "restarting"),  # not our child: how it ended is unknown, so it failed
        ("always", 0, "restarting"),
    ],
)
def test_the_restart_policy(policy: str, status: int | None, expected: str) -> None:
    supervisor, ops, _clock, record = rig(restart_policy=policy)
    assert record.pid is not None
    ops.running.discard(record.pid)
    if status is not None:
        ops.exits[record.pid] = status
    supervisor.round({"chat": record})
    assert record.state == expected
    if expected == "down":
        assert f"(restart_policy {policy})" in (record.last_error or "")


def test_a_stopped_model_is_left_alone_until_started() -> None:
    supervisor, ops, clock, record = rig()
    supervisor.stop(record)
    rounds(supervisor, clock, record, 30)
    assert (record.state, ops.spawned) == ("stopped", ["chat"])
    supervisor.start(record)
    supervisor.round({"chat": record})
    assert record.state == "healthy"


def test_a_server_never_ready_counts_as_a_failure() -> None:
    supervisor, ops, clock, record = rig(start_timeout_seconds=5)
    ops.ready_ok = False
    ops.kill(record)
    rounds(supervisor, clock, record, 2)  # restarted after the backoff, not ready
    assert record.state == "restarting" and record.pid is not None
    rounds(supervisor, clock, record, 6)
    assert record.last_error == "not ready within 5s"


def test_describe_exit() -> None:
    assert describe_exit(None, "") == "exited"
    assert describe_exit(-15, "bye") == "killed by SIGTERM: bye"
    assert describe_exit(2, "") == "exited with status 2"


def test_each_change_of_state_is_logged_with_why() -> None:
    supervisor, ops, clock, record = rig()
    said: list[str] = []
    supervisor.log = said.append
    ops.kill(record)
    rounds(supervisor, clock, record, 5)
    assert said == ["chat: restarting (killed by SIGKILL: RuntimeError: CUDA out of memory)", "chat: healthy"]
