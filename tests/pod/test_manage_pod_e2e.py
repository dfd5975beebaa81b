"""manage_pod.py end to end, as processes, against the fake RunPod API whose pods are real mock vLLM servers.

Each test works in its own directory (config, state, pid files, cache) and checks what a user would: the
endpoint works, nothing is left billing, no process of ours or port is left behind. Kills at each phase and
RunPod's own faults (500 on create, failing DELETEs, a reclaimed pod, a clock jump, two runs at once) are in
tests/faults/test_cost_safety.py. The lifecycle's decisions (GPU failover, the ready timeout, reuse and
replacement, expiry and idleness, crash loops) are tested in-process in tests/pod/test_session.py and test_watchdog.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import httpx
import pytest

from tests.support.e2e_harness import (
    API_KEY,
    MODEL,
    FakeRunPod,
    Workdir,
    assert_no_survivors,
    assert_nothing_left,
    pid_alive,
)
from tests.support.helpers import wait_until

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ journeys
def test_up_chat_reuse_status_shutdown(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    up = workdir.run()
    assert up.returncode == 0, up.stderr
    assert f"http://127.0.0.1:{workdir.proxy_port}/v1" in up.stdout
    assert MODEL in up.stdout
    state = workdir.state()
    assert state["phase"] == "ready" and state["pod_name"].startswith("llmpod-")
    assert oct(workdir.state_file.stat().st_mode)[-3:] == "600"  # it holds the pod's vLLM key

    first = workdir.chat()
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] == "MISS"
    assert workdir.chat().headers["x-cache"] == "HIT"
    streamed = workdir.chat(stream=True, stream_options={"include_usage": True})
    assert streamed.headers["x-cache"] == "HIT" and streamed.text.rstrip().endswith("data: [DONE]")

    again = workdir.run()
    assert again.returncode == 0, again.stderr
    assert "reusing pod" in again.stderr
    assert workdir.state()["pod_id"] == state["pod_id"]
    assert fake_runpod.creates() == 1

    status = workdir.run("--status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["pod"]["status"] == "RUNNING" and report["proxy"]["healthy"] is True
    assert report["pod"]["cost_per_hour"] > 0 and report["proxy"]["cache_entries"] == 1
    # the hit rates and what the two hits saved, at the pod's $/h that manage_pod.py handed the proxy
    cache = report["proxy"]["cache"]
    assert (cache["all_time"]["hits"], cache["all_time"]["lookups"]) == (2, 3)
    assert cache["cost_per_hour"] == state["cost_per_hour"] == report["pod"]["cost_per_hour"]
    saved = cache["all_time"]
    assert saved["generation_seconds_saved"] > 0
    assert saved["usd_saved"] == pytest.approx(
        saved["generation_seconds_saved"] * cache["cost_per_hour"] / 3600, abs=1e-6
    )
    assert cache["clients"]["other"]["all_time"]["hits"] == 2  # httpx's User-Agent is no family's

    down = workdir.run("--shutdown")
    assert down.returncode == 0, down.stderr
    assert state["pod_id"] in down.stdout
    assert "cache: 2 hits of 3 lookups (67%) since the proxy started, saved" in down.stdout
    assert_nothing_left(workdir, fake_runpod)
    assert list((workdir.path / "cache").glob("*.json"))  # the cache is kept
    assert workdir.run("--shutdown").stdout.strip() == "nothing was running; nothing to do"
    assert "last session ended" in workdir.run("--status").stdout


def test_the_watchdog_process_ends_an_idle_session(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    """The detached watchdog reads the real proxy's /metrics and terminates; its decisions (expiry, idleness,
    activity) are tests/pod/test_watchdog.py's."""
    workdir.write_config(idle_timeout_seconds=2)
    assert workdir.run().returncode == 0
    wait_until(lambda: not workdir.state_file.exists(), "the watchdog ended the session", timeout=40)
    assert_nothing_left(workdir, fake_runpod)
    last = json.loads((workdir.path / ".llmpod" / "last_session.json").read_text())
    assert "idle" in last["reason"]


def test_watchdog_restarts_a_dead_proxy(workdir: Workdir) -> None:
    assert workdir.run().returncode == 0
    old = workdir.pid("proxy")
    os.kill(old, signal.SIGKILL)  # type: ignore[arg-type]

    def answers() -> bool:
        try:
            return workdir.pid("proxy") != old and workdir.chat().status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, "proxy restarted by the watchdog")


# ------------------------------------------------------------------------------------------- failures
def test_missing_or_rejected_key_exits_2_creating_nothing(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    del workdir.env["RUNPOD_API_KEY"]
    missing = workdir.run()
    assert missing.returncode == 2 and "RUNPOD_API_KEY" in missing.stderr
    workdir.env["RUNPOD_API_KEY"] = "rpa_wrong"
    rejected = workdir.run()
    assert rejected.returncode == 2, rejected.stderr
    assert len(rejected.stderr.strip().splitlines()) == 1 and "rpa_wrong" not in rejected.stderr
    assert fake_runpod.creates() == 0


def test_bad_config_and_busy_port_exit_2_before_creating(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    workdir.write_config(gpu_type="NVIDIA RTX A6000")
    unknown = workdir.run()
    assert unknown.returncode == 2 and "gpu_type" in unknown.stderr
    workdir.write_config(modelStoreId="deepseek-coder-33b")
    assert workdir.run().returncode == 2
    workdir.write_config()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", workdir.proxy_port))
        taken.listen(1)
        busy = workdir.run()
    assert busy.returncode == 2 and str(workdir.proxy_port) in busy.stderr
    assert fake_runpod.creates() == 0


def test_leaked_pod_is_reported_and_removed_with_all(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    body = {
        "name": "llmpod-leaked01",
        "image": "vllm/vllm-openai:v0.33.0",
        "gpu": {"id": "NVIDIA L40S", "count": 1},
        "ports": ["8000/http"],
    }
    httpx.post(
        f"{fake_runpod.url}/v2/pods", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).raise_for_status()
    status = workdir.run("--status")
    assert "llmpod-leaked01" in status.stderr and "--shutdown --all" in status.stderr
    down = workdir.run("--shutdown", "--all")
    assert down.returncode == 0, down.stderr
    assert fake_runpod.live_pods() == []


# ------------------------------------------------------------------------------------------------ local
def test_local_provider_journey(tmp_path: Path) -> None:
    work = Workdir(tmp_path, None)
    try:
        up = work.run("--local")
        assert up.returncode == 0, up.stderr
        assert work.chat().status_code == 200 and work.chat().headers["x-cache"] == "HIT"
        pod_pid = int(work.state()["pod_id"].split("-")[1])
        assert pid_alive(pod_pid)
        status = work.run("--status")  # no --local needed: the state says where the pod is
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stderr
        down = work.run("--shutdown")
        assert down.returncode == 0, down.stderr
        assert not pid_alive(pod_pid)
        assert_nothing_left(work, None)
    finally:
        if work.state_file.exists():
            work.run("--local", "--shutdown", "--all", timeout=60)
        assert_no_survivors(work)


def test_watchdog_killed_after_ready_is_restarted_by_the_next_run(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    assert workdir.run().returncode == 0
    old = workdir.pid("watchdog")
    os.kill(old, signal.SIGKILL)  # type: ignore[arg-type]
    wait_until(lambda: not pid_alive(old), "watchdog dead")
    again = workdir.run()
    assert again.returncode == 0 and "reusing pod" in again.stderr
    assert pid_alive(workdir.pid("watchdog")) and workdir.pid("watchdog") != old
    assert fake_runpod.creates() == 1


def test_a_dead_pod_is_replaced_not_reused(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    assert workdir.run().returncode == 0
    old = workdir.state()["pod_id"]
    cached = workdir.chat()
    assert cached.headers["x-cache"] == "MISS"
    os.kill(workdir.pid("watchdog"), signal.SIGKILL)  # type: ignore[arg-type]
    httpx.post(f"{fake_runpod.url}/fake/pods/{old}/die", timeout=5).raise_for_status()
    again = workdir.run()
    assert again.returncode == 0, again.stderr
    assert workdir.state()["pod_id"] != old
    assert [p["id"] for p in fake_runpod.live_pods()] == [workdir.state()["pod_id"]]  # the dead one terminated
    assert workdir.chat().status_code == 200
    # the cache is preserved across the replacement (another pod, URL and proxy; the same kind and model)
    again = workdir.chat()
    assert (again.headers["x-cache"], again.json()) == ("HIT", cached.json())


def test_answers_of_the_local_mock_are_not_served_for_a_runpod_pod(workdir: Workdir, fake_runpod: FakeRunPod) -> None:
    local = workdir.run("--local")
    assert local.returncode == 0, local.stderr
    assert [workdir.chat().headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    assert workdir.run("--shutdown").returncode == 0
    up = workdir.run()  # the same cache directory, the same model id
    assert up.returncode == 0, up.stderr
    assert workdir.state()["provider"] == "runpod"
    first = workdir.chat()
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")  # was a HIT: the mock's answer
    assert first.headers["x-cache-kind"] == "vllm"
    assert workdir.chat().headers["x-cache"] == "HIT"
    assert len(list((workdir.path / "cache").glob("*.json"))) == 2
    assert workdir.run("--shutdown").returncode == 0


def test_extend_pushes_the_expiry(workdir: Workdir) -> None:
    assert workdir.run().returncode == 0
    before = workdir.state()["expires_at"]
    extended = workdir.run("--extend", "600")
    assert extended.returncode == 0 and "now expires" in extended.stdout
    assert workdir.state()["expires_at"] == pytest.approx(before + 600, abs=1)


def test_logs_show_the_pod_log(workdir: Workdir) -> None:
    assert workdir.run().returncode == 0
    logs = workdir.start("--logs")
    try:
        assert logs.stdout is not None
        first = logs.stdout.readline()
        assert first.strip()  # a vLLM start-up line from the pod's log
    finally:
        logs.terminate()
        logs.communicate(timeout=20)


def test_refresh_catalog_uses_runpod_prices_and_says_the_hub_did_not_answer(workdir: Workdir) -> None:
    refreshed = workdir.run("--refresh-catalog", "--verbose")
    assert refreshed.returncode == 0, refreshed.stderr
    assert "GPUs (runpod)" in refreshed.stdout and "$0.49/h" in refreshed.stdout
    assert MODEL in refreshed.stdout
    assert "Hugging Face" in refreshed.stderr  # nobody answers at HF_API_BASE: the built-in figures are kept
    assert (workdir.path / ".llmpod" / "catalog.json").exists()
