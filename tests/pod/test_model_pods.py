"""The watchdog's decisions about a RunPod model of llmModels (llmpod.pod.model_pods.ModelPods.check), in-process
over the in-memory provider: expiry and its own idleness stop it (not replaced), a reclaimed pod is replaced under
the restart policy and then called down, a start whose run was killed is cleaned up, one being made is left alone.
The same against the fake RunPod API, as processes: tests/pod/test_models_runpod.py."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from llmpod.pod.config import load_pod_config
from llmpod.pod.model_pods import ModelPods
from llmpod.pod.models_config import ModelSpec, load_models
from llmpod.pod.state import PodState, RuntimePaths, load_state, save_state
from llmpod.pod.supervisor import ModelRecord, ProcessOps, Supervisor
from tests.fakes.fake_provider import FakeClock, FakeProvider

MODEL = "deepseek-coder-33b-instruct-awq"


class Rig:
    def __init__(self, tmp_path: Path, **entry: object) -> None:
        path = tmp_path / "pod_config.json"
        path.write_text(json.dumps({"llmModels": {"big": {"modelStoreId": MODEL, "max_restarts": 1, **entry}}}))
        self.paths = RuntimePaths(tmp_path)
        self.paths.ensure()
        (self.paths.run_dir / "models").mkdir(mode=0o700)
        config = load_pod_config(path)
        self.specs = load_models(config, tmp_path)
        self.spec: ModelSpec = self.specs[0]
        self.pods = ModelPods(config, path, self.paths, self.specs, local=True, creating=False)
        self.provider = FakeProvider(FakeClock(time.time()))
        self.session = self.pods.session("big")
        self.session.provider = self.provider
        self.session.sleep = lambda seconds: None
        self.supervisor = Supervisor(self.specs, ProcessOps(self.paths, tmp_path))
        self.record = ModelRecord(id="big", kind="runpod", state="healthy")

    def pod(self, **fields: object) -> PodState:
        """A ready pod of ours on the fake, recorded as the session records one."""
        now = time.time()
        name = f"llmpod-{secrets.token_hex(4)}"
        pod = self.provider.add_pod(name)
        values: dict[str, object] = {
            "provider": "runpod",
            "phase": "ready",
            "pod_name": name,
            "pod_id": pod.id,
            "model_id": MODEL,
            "served_model": MODEL,
            "vllm_api_key": "k" * 32,
            "created_at": now - 60,
            "ready_at": now - 30,
            "expires_at": now + 3600,
            "idle_timeout_seconds": 0,
            "proxy_port": 8000,
            "upstream_url": f"https://{pod.id}-8000.proxy.runpod.net/v1",
        }
        state = PodState.model_validate({**values, **fields})
        save_state(self.session.paths, state)
        return state

    def check(self, active_at: float | None = None) -> str | None:
        return self.pods.check(self.spec, self.record, self.supervisor, time.time() if active_at is None else active_at)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.pods.close()


def test_a_live_pod_in_use_is_left_alone(rig: Rig) -> None:
    rig.pod(idle_timeout_seconds=60)
    assert rig.check() is None
    assert rig.record.state == "healthy" and len(rig.provider.pods) == 1


def test_expiry_terminates_it_and_it_stays_stopped(rig: Rig) -> None:
    rig.pod(expires_at=time.time() - 1)
    assert rig.check() is None
    assert rig.provider.pods == {} and load_state(rig.session.paths) is None
    assert rig.record.state == "stopped" and rig.record.stopped
    assert rig.record.last_error is not None and rig.record.last_error.startswith("expired: runtime_seconds reached")
    assert "--start big" in rig.record.last_error


def test_its_own_idleness_stops_it(rig: Rig) -> None:
    rig.pod(idle_timeout_seconds=60, ready_at=time.time() - 300)
    assert rig.check(active_at=time.time() - 30) is None  # asked 30 s ago: not idle
    assert rig.record.state == "healthy"
    assert rig.check(active_at=time.time() - 120) is None
    assert rig.record.state == "stopped" and "idle: no answer for" in (rig.record.last_error or "")
    assert rig.provider.pods == {}


def test_a_reclaimed_pod_is_replaced_then_down_past_max_restarts(rig: Rig) -> None:
    first = rig.pod()
    assert first.pod_id is not None
    rig.provider.reclaim(first.pod_id)
    assert rig.check() is None  # the first backoff (1 s) has not passed yet
    assert rig.record.state == "restarting" and len(rig.record.restart_times) == 1
    assert "reclaimed" in (rig.record.last_error or "") and load_state(rig.session.paths) is None
    rig.record.next_restart_at = time.time() - 1
    assert rig.check() == "replace"
    # the replacement came up, and was reclaimed too: max_restarts (1) reached, down with why
    second = rig.pod()
    rig.record.state = "healthy"
    assert second.pod_id is not None
    rig.provider.reclaim(second.pod_id)
    assert rig.check() is None
    assert rig.record.state == "down" and "max_restarts reached" in (rig.record.last_error or "")
    assert rig.check() is None  # down: never replaced again


def test_a_start_whose_run_was_killed_is_cleaned_up_and_retried(rig: Rig) -> None:
    made = rig.pod(phase="waiting")
    rig.record.state = "starting"
    assert rig.check() is None
    assert rig.provider.pods == {}, "the abandoned pod bills no longer"
    assert made.pod_id not in rig.provider.pods and load_state(rig.session.paths) is None
    assert rig.record.state == "restarting" and "abandoned" in (rig.record.last_error or "")


def test_a_pod_being_made_is_left_to_the_run_making_it(rig: Rig) -> None:
    rig.pod(phase="waiting")
    rig.record.state = "starting"
    with FileLock(str(rig.session.paths.lock_file)):
        assert rig.check() is None
    assert len(rig.provider.pods) == 1 and rig.record.state == "starting"


def test_a_ready_pod_whose_maker_is_gone_is_adopted(rig: Rig) -> None:
    state = rig.pod()
    rig.record.state = "restarting"
    assert rig.check() == "adopted"
    assert rig.record.state == "healthy" and rig.record.pod_id == state.pod_id
    assert rig.record.base_url == state.upstream_url and rig.record.expires_at == state.expires_at


def test_backend_hands_over_the_pods_url_and_key_only_while_it_is_ready(rig: Rig) -> None:
    assert rig.pods.backend(rig.spec, None, "f").base_url == "http://127.0.0.1:9/v1"  # no pod yet
    state = rig.pod()
    backend = rig.pods.backend(rig.spec, rig.record, "f")
    assert backend.base_url == state.upstream_url and backend.api_key is not None
    assert backend.api_key.get_secret_value() == "k" * 32 and "k" * 32 not in repr(backend)
    assert backend.served_model == MODEL and backend.state_file == "f"
