"""The fake RunPod's log stream stays open as RunPod's does (tests/fakes/fake_runpod_logs.py), and llmpod's client
copes: ``pod_logs`` returns, ``follow_logs`` follows and ends quietly when the pod goes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmpod.pod.providers import RunPodClient
from tests.fakes import fake_runpod_logs as fake_logs
from tests.fakes import fake_runpod_pods as fake_pods
from tests.fakes.test_fake_runpod import API_KEY, ROOT, Fake, running_fake, vllm_body
from tests.support.helpers import wait_until
from tests.support.servers import free_port, wait_for_port

STREAM = {"provisioning_seconds": 0.3, "starting_seconds": 0.3, "vllm_load_seconds": 0.3}  # open streams
READ = httpx.Timeout(10.0)  # a stream that should have ended, but did not, fails the test with a ReadTimeout


@pytest.fixture
def fake() -> Iterator[Fake]:
    with running_fake(dict(STREAM)) as handle:
        yield handle


def events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The events of a log stream as they arrive: ``{"id", "ts", "source", "line"}``."""
    event_id: str | None = None
    for raw in response.iter_lines():
        if raw.startswith("id: "):
            event_id = raw[4:]
        elif raw.startswith("data: "):
            yield {"id": event_id, **json.loads(raw[6:])}


def logged(fake: Fake, pod_id: str) -> list[dict[str, str]]:
    return fake.state.pods[pod_id].logs()


class Follower(threading.Thread):
    """``follow_logs`` in a thread: its lines as they come, and how it ended."""

    def __init__(self, client: RunPodClient, pod_id: str) -> None:
        super().__init__(daemon=True)
        self.client, self.pod_id = client, pod_id
        self.lines: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for line in self.client.follow_logs(self.pod_id):
                self.lines.append(line)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def ended(self) -> bool:
        self.join(timeout=30)
        return not self.is_alive()


# ------------------------------------------------------------------------------------------------ the stream
def test_the_stream_stays_open_and_sends_each_new_line_once(fake: Fake) -> None:
    pod = fake.create()
    with fake.api.stream("GET", f"/v2/pods/{pod['id']}/logs", timeout=READ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        stream, received = events(response), []
        for item in stream:  # the pod was PROVISIONING: all but two lines come later, on this stream
            received.append(item)
            if item["line"] == "(APIServer pid=1) INFO:     Application startup complete.":
                break
        assert fake.api.delete(f"/v2/pods/{pod['id']}").status_code == 204
        received += list(stream)  # it ends a moment after the pod is gone
    assert received[-1]["line"] == "Pod terminated"
    assert received == logged(fake, pod["id"])  # every line, in order, none twice


def test_a_crash_loop_streams_in_time_order_with_stable_ids(fake: Fake) -> None:
    fake.configure(crash_loop=["OSError: gated repo"], crash_after_seconds=0.3)
    pod = fake.create()
    with fake.api.stream("GET", f"/v2/pods/{pod['id']}/logs", params={"tail": 5000}, timeout=READ) as response:
        stream, received = events(response), []
        for item in stream:
            received.append(item)
            if sum(i["line"] == "OSError: gated repo" for i in received) == 3:
                break
        assert fake.api.delete(f"/v2/pods/{pod['id']}").status_code == 204
        received += list(stream)
    assert received == logged(fake, pod["id"])
    resumed = fake.api.get(f"/v2/pods/{pod['id']}/logs", headers={"Last-Event-ID": received[9]["id"]})
    assert resumed.status_code == 404  # gone; while it lived, Last-Event-ID named the same line each time


def test_a_crash_looping_pods_log_only_grows() -> None:
    body = vllm_body(image="vllm/vllm-openai:v0.33.0")
    pod = fake_pods.FakePod(
        fake_pods.parse_create(body), fake_pods.GPUS["NVIDIA RTX A6000"], "US-KS-2", "12.4", 0.0, 0.0, 0.0
    )
    pod.crash = fake_pods.CrashLoop(("torch.OutOfMemoryError: CUDA out of memory.",), after=1.0)
    earlier: list[dict[str, str]] = []
    for seconds in (0.0, 0.5, 0.95, 1.0, 2.3, 7.9):
        now = pod.logs(pod.running_at + seconds)
        assert now[: len(earlier)] == earlier and len(now) >= len(earlier)  # ids and lines: a prefix, kept
        earlier = now
    assert [int(line["id"].rsplit("/", 1)[1]) for line in earlier] == list(range(1, len(earlier) + 1))


def test_since_last_event_id_and_source_pick_the_backlog(fake: Fake) -> None:
    fake.configure(log_stream_seconds=0)  # the backlog alone
    pod = fake.ready()
    everything = logged(fake, pod["id"])
    url = f"/v2/pods/{pod['id']}/logs"
    resumed = fake.api.get(url, headers={"Last-Event-ID": everything[-3]["id"]})
    assert [e["line"] for e in events(resumed)] == [line["line"] for line in everything[-2:]]
    since = fake.api.get(url, params={"since": everything[0]["ts"], "source": "system"})
    assert [e["line"] for e in events(since)] == [line["line"] for line in everything if line["source"] == "system"]
    assert fake.api.get(url, params={"since": "yesterday"}).status_code == 422


def test_log_stream_seconds_ends_a_stream(fake: Fake) -> None:
    fake.configure(provisioning_seconds=60.0, log_stream_seconds=0.5)
    pod = fake.create()
    with fake.api.stream("GET", f"/v2/pods/{pod['id']}/logs", timeout=READ) as response:
        assert [e["line"] for e in events(response)] == [line["line"] for line in logged(fake, pod["id"])]


def test_the_stream_ends_when_the_client_leaves(fake: Fake) -> None:
    pod = fake.create()
    with fake.api.stream("GET", f"/v2/pods/{pod['id']}/logs", timeout=READ) as response:
        next(events(response))
        assert fake_logs.OPEN[pod["id"]] == 1
    wait_until(lambda: fake_logs.OPEN[pod["id"]] == 0, "the fake noticed the client left")


def test_the_stream_ends_cleanly_when_the_fake_process_stops() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_runpod", "--port", str(port), "--api-key", API_KEY],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_port(port)
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=READ
        )
        with api:
            pod_id = api.post("/v2/pods", json=vllm_body()).json()["id"]
            with api.stream("GET", f"/v2/pods/{pod_id}/logs") as response:
                stream = events(response)
                next(stream)
                process.send_signal(signal.SIGTERM)
                rest = list(stream)  # a cut stream raises here (an incomplete chunked body)
        assert all(item["id"] for item in rest)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------- llmpod's client
def test_pod_logs_returns_the_backlog_of_a_stream_that_stays_open(fake: Fake) -> None:
    pod = fake.ready()
    lines: list[str] = []
    with RunPodClient(API_KEY, fake.url) as client:
        reader = threading.Thread(target=lambda: lines.extend(client.pod_logs(pod["id"], tail=50, wait=0.5)))
        reader.start()
        reader.join(timeout=30)  # it stops at its read timeout (`wait`): the stream itself never would
        assert not reader.is_alive()
    assert lines == [line["line"] for line in logged(fake, pod["id"])]


def test_follow_logs_follows_the_stream_and_ends_when_the_pod_goes(fake: Fake) -> None:
    pod = fake.create()
    with RunPodClient(API_KEY, fake.url) as client:
        follower = Follower(client, pod["id"])
        follower.start()
        wait_until(
            lambda: "(APIServer pid=1) INFO:     Application startup complete." in follower.lines,
            "the lines vLLM logs after follow_logs began",
        )
        assert fake.api.delete(f"/v2/pods/{pod['id']}").status_code == 204
        assert follower.ended() and follower.error is None
    assert follower.lines == [line["line"] for line in logged(fake, pod["id"])]


def test_follow_logs_ends_quietly_when_the_pod_is_gone_on_reopening(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_logs, "GONE_GRACE", 60.0)  # the stream outlives the pod: the client's idle cut acts
    pod = fake.ready()
    with RunPodClient(API_KEY, fake.url, follow_idle=0.2) as client:
        follower = Follower(client, pod["id"])
        follower.start()
        wait_until(lambda: len(follower.lines) == len(logged(fake, pod["id"])), "the backlog read")
        httpx.post(f"{fake.url}/fake/pods/{pod['id']}/vanish", timeout=5).raise_for_status()
        assert follower.ended() and follower.error is None  # not RunPodNotFound: the pod's log is simply over
    assert fake.fake_state()["calls"]["GET /v2/pods/{pod_id}/logs"] >= 2  # it reopened after the idle cut
