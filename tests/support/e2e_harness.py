"""Drive manage_pod.py as a user would, as processes, against the fake RunPod API (tests/fakes/fake_runpod.py).

A ``Workdir`` is a directory with a pod_config.json where manage_pod.py runs; the checks at the bottom are
what every end-to-end test ends with: nothing billing, no state, no helper process or port left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from llmpod.pod import processes
from tests.support.helpers import wait_until
from tests.support.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "rpa_test_key_for_the_fake_only"
MODEL = "deepseek-coder-33b-instruct-awq"


class FakeRunPod:
    def __init__(self, url: str) -> None:
        self.url = url

    def configure(self, **switches: Any) -> None:
        httpx.post(f"{self.url}/fake/config", json=switches, timeout=5).raise_for_status()

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/fake/state", timeout=5).json()  # type: ignore[no-any-return]

    def live_pods(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/v2/pods", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        return response.json()["pods"]  # type: ignore[no-any-return]

    def creates(self) -> int:
        return int(self.state()["calls"].get("POST /v2/pods", 0))

    def spec_violations(self) -> list[str]:
        """What broke the official RunPod spec since the last reset: llmpod's requests or the fake's answers."""
        return list(self.state()["specViolations"])

    def assert_spec_kept(self) -> None:
        violations = list(dict.fromkeys(self.spec_violations()))  # each once: a poll repeats its request
        assert not violations, "the RunPod API spec was broken:\n" + "\n".join(violations)


@contextlib.contextmanager
def running_fake_runpod(*extra_args: str) -> Iterator[FakeRunPod]:
    """The fake RunPod API as a process on a free port, with fast pod phases (``extra_args`` override)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.fake_runpod",
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--provisioning-seconds",
            "0.2",
            "--starting-seconds",
            "0.2",
            "--vllm-load-seconds",
            "0.3",
            *extra_args,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port)
        yield FakeRunPod(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


class Workdir:
    """A directory with a pod_config.json, where manage_pod.py runs as the user would run it."""

    def __init__(self, path: Path, fake: FakeRunPod | None) -> None:
        self.path = path
        self.proxy_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "MOCK_", "PROXY_"))}
        self.env["HF_API_BASE"] = f"http://127.0.0.1:{free_port()}"  # nobody there: the built-in catalog is used
        if fake is not None:
            self.env.update(
                RUNPOD_API_KEY=API_KEY,
                RUNPOD_API_BASE=fake.url,
                RUNPOD_POD_URL_TEMPLATE=f"{fake.url}/proxy/{{pod_id}}-{{port}}",
            )
        self.write_config()

    def write_config(self, **overrides: Any) -> None:
        config = {
            "modelStoreId": MODEL,
            "gpu_type_id": "NVIDIA RTX A6000",
            "gpu_type_ids": ["NVIDIA L40S"],
            "runtime_seconds": 3600,
            "idle_timeout_seconds": 0,
            "proxy_port": self.proxy_port,
            "cache_dir": str(self.path / "cache"),
            "watchdog_interval_seconds": 0.3,
            "ready_timeout_seconds": 60,
            **overrides,
        }
        (self.path / "pod_config.json").write_text(json.dumps(config))

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "manage_pod.py"), *args],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "manage_pod.py"), *args],
            cwd=self.path,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def state_file(self) -> Path:
        return self.path / "pod_state.json"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())  # type: ignore[no-any-return]

    def pid(self, name: str) -> int | None:
        try:
            return int((self.path / ".llmpod" / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def chat(self, content: str = "def hello", **extra: Any) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.proxy_port}/v1/chat/completions",
            timeout=30,
            json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 32000, **extra},
        )


def vllm_crash_lines(name: str) -> list[str]:
    """What one life of a crashing vLLM container prints after its banner (tests/fixtures/vllm_logs/NAME.log), for
    the fake RunPod's ``crash_loop`` switch (the fake prints a banner of its own at each start)."""
    lines = (ROOT / "tests" / "fixtures" / "vllm_logs" / f"{name}.log").read_text().splitlines()
    return lines[next((i + 1 for i, line in enumerate(lines) if "non-default args" in line), 0) :]


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def cleanup(work: Workdir) -> None:
    """Whatever a test left: stop it, so no process or port leaks into the next test; then fail the test if
    anything of this directory had survived its own shutdown (a leak a user would have too)."""
    if work.state_file.exists() or work.pid("proxy") or work.pid("watchdog"):
        work.run("--shutdown", "--all", timeout=60)
    assert_no_survivors(work)


def assert_no_survivors(work: Workdir) -> None:
    def survivors() -> list[int]:
        return [
            pid
            for marker in ("LLMPOD_PROXY_OF", "LLMPOD_WATCHDOG_OF")
            for pid in processes.find_by_environ(marker, str(work.path.resolve()))
        ]

    try:  # a watchdog that ended the session exits a moment after clearing it
        wait_until(lambda: not survivors(), "every helper process exited", timeout=10)
    except AssertionError:
        left = {pid: processes.cmdline(pid) for pid in survivors()}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"processes outlived --shutdown: {left}") from None


def assert_nothing_left(work: Workdir, fake: FakeRunPod | None) -> None:
    if fake is not None:
        assert fake.live_pods() == []
    assert not work.state_file.exists()
    for name in ("proxy", "watchdog"):  # a watchdog that ended the session exits right after clearing it
        wait_until(lambda name=name: not pid_alive(work.pid(name)), f"{name} exited", timeout=10)
    wait_until(lambda: port_free(work.proxy_port), "proxy port free", timeout=10)
