"""A RunPod entry of llmModels beside a local model (issue 18), as processes against the fake RunPod API, whose pods
are real mock vLLM servers: one pod per RunPod model, handed to the proxy with its URL and key, replaced when
RunPod reclaims it, stopped alone when it is idle, acted on with --stop/--start, and nothing left billing after
--shutdown. The decisions themselves are tested in-process in tests/pod/test_model_pods.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.e2e_harness import MODEL, FakeRunPod, port_free
from tests.support.helpers import wait_until
from tests.support.models_harness import Mixed, models_dir

pytestmark = pytest.mark.slow


@pytest.fixture
def mixed(tmp_path: Path, fake_runpod: FakeRunPod) -> Iterator[Mixed]:
    with models_dir(tmp_path, lambda path: Mixed(path, fake_runpod)) as work:
        assert isinstance(work, Mixed)
        yield work
    assert fake_runpod.live_pods() == [], "a pod was left billing"


def test_a_pod_per_runpod_model_replaced_stopped_started_and_terminated(mixed: Mixed) -> None:
    up = mixed.run()
    assert up.returncode == 0, up.stderr
    assert "big: healthy (runpod" in up.stdout and "/h)" in up.stdout
    assert mixed.fake.creates() == 1
    pod = mixed.pod_record()
    assert pod["phase"] == "ready" and pod["pod_name"].startswith("llmpod-")
    (state_file,) = (mixed.path / ".llmpod" / "pods").glob("big-*/pod_state.json")
    assert oct(state_file.stat().st_mode)[-3:] == "600"  # it holds the pod's vLLM key
    # the proxy was handed the pod's URL and key; the local model as before
    backends = mixed.proxy_backends()
    assert backends["big"].base_url == pod["upstream_url"]
    assert backends["big"].api_key is not None and backends["big"].api_key.get_secret_value() == pod["vllm_api_key"]
    assert mixed.ask("big").json()["model"] == MODEL and mixed.ask("chat").json()["model"] == "chat"
    status = json.loads(mixed.run("--status", "--json").stdout)
    (big,) = [row for row in status["models"] if row["id"] == "big"]
    assert big["state"] == "healthy" and big["pod_id"] == pod["pod_id"] and big["cost_per_hour"] > 0

    # RunPod reclaims the pod: the watchdog makes a new one (restarts 1) and hands it to the proxy, through the
    # model's state file: the proxy is not restarted, so the local model's requests are never interrupted
    proxy_pid = (mixed.path / ".llmpod" / "proxy.pid").read_text()
    httpx.post(f"{mixed.fake.url}/fake/pods/{pod['pod_id']}/vanish", timeout=5).raise_for_status()

    def replaced() -> bool:
        record = mixed.record("big")
        return record["state"] == "healthy" and record["pod_id"] not in (None, pod["pod_id"])

    wait_until(replaced, "big replaced by a new pod", timeout=60)
    assert len(mixed.record("big")["restart_times"]) == 1 and mixed.fake.creates() == 2
    assert mixed.pod_record()["expires_at"] == pod["expires_at"]  # the replacement keeps the session's expiry
    wait_until(lambda: mixed.served("big"), "the proxy serves big from the new pod", timeout=30)
    assert mixed.ask("chat").status_code == 200
    assert (mixed.path / ".llmpod" / "proxy.pid").read_text() == proxy_pid

    # --stop: its pod terminated, the local model unaffected, big refused at once
    stop = mixed.run("--stop", "big")
    assert stop.returncode == 0, stop.stderr
    assert "pod terminated" in stop.stdout
    assert [p["name"] for p in mixed.fake.live_pods()] == []
    refused = mixed.ask("big")
    assert refused.status_code == 503 and "big" in refused.json()["error"]["message"]
    assert mixed.ask("chat").status_code == 200

    start = mixed.run("--start", "big")
    assert start.returncode == 0, start.stderr
    assert mixed.fake.creates() == 3 and len(mixed.fake.live_pods()) == 1
    wait_until(lambda: mixed.served("big"), "big served again", timeout=30)
    started = mixed.record("big")["pod_id"]
    restart = mixed.run("--restart", "big")
    assert restart.returncode == 0, restart.stderr
    assert mixed.fake.creates() == 4 and [p["id"] for p in mixed.fake.live_pods()] == [mixed.record("big")["pod_id"]]
    assert mixed.record("big")["pod_id"] != started
    wait_until(lambda: mixed.served("big"), "big served from the restarted pod", timeout=30)

    down = mixed.run("--shutdown")
    assert down.returncode == 0, down.stderr
    assert "terminated pod" in down.stdout
    assert mixed.fake.live_pods() == [] and port_free(mixed.proxy_port) and not mixed.ours()


def test_an_idle_runpod_model_is_stopped_alone(mixed: Mixed) -> None:
    mixed.write(idle_timeout_seconds=3)
    up = mixed.run()
    assert up.returncode == 0, up.stderr
    wait_until(lambda: mixed.record("big")["state"] == "stopped", "big stopped when idle", timeout=30)
    assert "idle" in mixed.record("big")["last_error"]
    assert mixed.fake.live_pods() == []
    assert mixed.record("chat")["state"] == "healthy" and mixed.ask("chat").status_code == 200
    assert mixed.ask("big").status_code == 503
    status = mixed.run("--status")
    assert status.returncode == 0, status.stderr
    assert "  big: stopped (" in status.stdout and "idle: no answer for" in status.stdout


def test_a_pod_that_cannot_be_had_leaves_nothing_running(mixed: Mixed) -> None:
    mixed.fake.configure(no_capacity_gpu_ids=["NVIDIA RTX A6000", "NVIDIA L40S"])
    up = mixed.run()
    assert up.returncode == 1, up.stdout
    assert "no GPU could be had" in up.stderr
    assert mixed.fake.live_pods() == [] and not mixed.ours() and port_free(mixed.proxy_port)
    assert not (mixed.path / "pod_state.json").exists()


def test_shutdown_all_removes_a_leaked_pod(mixed: Mixed) -> None:
    """A pod of ours that no record names (a run killed before it saved one) is reported, and --all removes it."""
    up = mixed.run()
    assert up.returncode == 0, up.stderr
    for state in (mixed.path / ".llmpod" / "pods").glob("big-*/pod_state.json"):
        state.unlink()  # the record lost: the pod billing unseen
    status = mixed.run("--status")
    assert "is not recorded" in status.stderr and "--shutdown --all" in status.stderr
    down = mixed.run("--shutdown", "--all")
    assert down.returncode == 0, down.stderr
    assert mixed.fake.live_pods() == []
