"""Faults with several models behind one proxy (issue 18), against manage_pod.py as processes: one model's server
killed while a client keeps using the other, killed again and again past its restart limit, the proxy killed.
Counted from the user's side: answers the other model lost, a killed model that did not come back (or did not end
``down`` with its reason), processes and ports left after ``--shutdown``. Area "several models"."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.ledger import FaultLedger
from tests.support.e2e_harness import FakeRunPod, pid_alive, port_free
from tests.support.helpers import wait_until
from tests.support.models_harness import Mixed, Models, models_dir

AREA = "several models"
pytestmark = pytest.mark.soak


class Client(threading.Thread):
    """Asks one model, directly at its base_url, until stopped; counts what failed."""

    def __init__(self, models: Models, model: str, port: int) -> None:
        super().__init__(daemon=True)
        self.models, self.model, self.port = models, model, port
        self.done = threading.Event()
        self.asked = self.failed = 0

    def run(self) -> None:
        while not self.done.is_set():
            self.asked += 1
            if not self.models.answers(self.model, self.port):
                self.failed += 1

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Models]:
    with models_dir(tmp_path) as work:
        up = work.run()
        assert up.returncode == 0, up.stderr
        yield work


def leaks(models: Models) -> tuple[int, int]:
    """After --shutdown: processes of ours and ports still held."""
    result = models.run("--shutdown")
    processes_left = len(models.ours()) + (result.returncode != 0)
    ports = sum(not port_free(p) for p in (models.proxy_port, models.chat_port, models.auto_port))
    return processes_left, ports


def kill_and_wait(models: Models, notes: list[str]) -> bool:
    """SIGKILL chat's server; True when it is then healthy again on a new process."""
    pid = models.record("chat")["pid"]
    os.kill(pid, signal.SIGKILL)
    try:
        wait_until(lambda: models.record("chat")["pid"] not in (pid, None), "a new chat process", timeout=60)
        wait_until(lambda: models.state("chat").state == "healthy", "chat healthy", timeout=60)
    except AssertionError as exc:
        notes.append(str(exc).splitlines()[0])
        return False
    return models.answers("chat", models.chat_port)


def test_one_model_killed_within_its_limit(models: Models, fault_ledger: FaultLedger) -> None:
    models.write()  # max_restarts 2 for chat: two kills, both come back
    notes: list[str] = []
    other = Client(models, "auto", models.auto_port)
    other.start()
    came_back = [kill_and_wait(models, notes) for _ in range(2)]
    other.stop()
    processes_left, ports = leaks(models)
    fault_ledger.record(
        AREA,
        "one model's server killed (SIGKILL) within its restart limit, the other in use",
        injected=2,
        lost_answers=other.failed,
        dirty_errors=came_back.count(False),
        leaked_processes=processes_left,
        leaked_ports=ports,
        notes=notes,
    )


def test_one_model_killed_past_its_limit(models: Models, fault_ledger: FaultLedger) -> None:
    notes: list[str] = []
    other = Client(models, "auto", models.auto_port)
    other.start()
    for _ in range(2):  # max_restarts 2: back twice ...
        kill_and_wait(models, notes)
    os.kill(models.record("chat")["pid"], signal.SIGKILL)  # ... then down
    wait_until(lambda: models.state("chat").state == "down", "chat down", timeout=60)
    down = models.state("chat")
    other.stop()
    wrong = int("max_restarts reached" not in (down.last_error or "")) + int(not port_free(models.chat_port))
    if wrong:
        notes.append(f"down as {down.last_error!r}")
    processes_left, ports = leaks(models)
    fault_ledger.record(
        AREA,
        "one model's server killed (SIGKILL) past its restart limit, the other in use",
        injected=3,
        lost_answers=other.failed,
        dirty_errors=wrong,
        leaked_processes=processes_left,
        leaked_ports=ports,
        notes=notes,
    )


def test_the_proxy_killed(models: Models, fault_ledger: FaultLedger) -> None:
    servers = {m: models.record(m)["pid"] for m in ("chat", "auto")}
    clients = [Client(models, "chat", models.chat_port), Client(models, "auto", models.auto_port)]
    for client in clients:
        client.start()
    notes: list[str] = []
    pid_file = models.path / ".llmpod" / "proxy.pid"
    proxy = int(pid_file.read_text())
    os.kill(proxy, signal.SIGKILL)
    came_back = True
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != str(proxy), "new proxy", timeout=60)
        wait_until(lambda: models.answers("chat", models.proxy_port), "the proxy answers", timeout=60)
    except AssertionError as exc:
        notes.append(str(exc).splitlines()[0])
        came_back = False
    for client in clients:
        client.stop()
    untouched = all(pid_alive(pid) and models.record(m)["pid"] == pid for m, pid in servers.items())
    processes_left, ports = leaks(models)
    fault_ledger.record(
        AREA,
        "the proxy killed (SIGKILL) with both models in use",
        injected=1,
        lost_answers=sum(c.failed for c in clients),
        dirty_errors=int(not came_back) + int(not untouched),
        leaked_processes=processes_left,
        leaked_ports=ports,
        notes=notes,
    )


def test_a_runpod_models_pod_reclaimed_within_and_past_its_limit(
    tmp_path: Path, fake_runpod: FakeRunPod, fault_ledger: FaultLedger
) -> None:
    """RunPod takes back the pod of ``big`` (max_restarts 1): replaced once, then down with why; the local model
    in use all along; no pod billing once it is down, nor after --shutdown."""
    notes: list[str] = []
    with models_dir(tmp_path, lambda path: Mixed(path, fake_runpod)) as work:
        assert isinstance(work, Mixed)
        up = work.run()
        assert up.returncode == 0, up.stderr
        other = Client(work, "chat", work.proxy_port)  # through the proxy, which is handed each new pod
        other.start()
        wrong = 0
        first = work.record("big")["pod_id"]
        httpx.post(f"{fake_runpod.url}/fake/pods/{first}/vanish", timeout=5).raise_for_status()
        try:
            wait_until(
                lambda: work.record("big")["state"] == "healthy" and work.record("big")["pod_id"] not in (None, first),
                "big replaced",
                timeout=90,
            )
            wait_until(lambda: work.served("big"), "big served from its new pod", timeout=30)
        except AssertionError as exc:
            notes.append(str(exc).splitlines()[0])
            wrong += 1
        second = work.record("big")["pod_id"]
        httpx.post(f"{fake_runpod.url}/fake/pods/{second}/vanish", timeout=5).raise_for_status()
        wait_until(lambda: work.record("big")["state"] == "down", "big down", timeout=60)
        last_error = work.record("big")["last_error"] or ""
        if "max_restarts reached" not in last_error:
            notes.append(f"down as {last_error!r}")
            wrong += 1
        billing_while_down = len(fake_runpod.live_pods())
        other.stop()
        down = work.run("--shutdown")
        processes_left = len(work.ours()) + (down.returncode != 0)
        ports = sum(not port_free(p) for p in (work.proxy_port, work.chat_port))
    fault_ledger.record(
        AREA,
        "a RunPod model's pod reclaimed within and past its restart limit, the local model in use",
        injected=2,
        lost_answers=other.failed,
        dirty_errors=wrong,
        pods_left_running=billing_while_down + len(fake_runpod.live_pods()),
        leaked_processes=processes_left,
        leaked_ports=ports,
        notes=notes,
    )
