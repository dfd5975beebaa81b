"""Several models started by manage_pod.py (issue 18) in a temp dir: two mock vLLM servers, ``chat`` and ``auto``,
from ``command`` entries on free ports (``Models``), or ``chat`` beside a RunPod entry ``big`` on the fake RunPod
(``Mixed``), for the end-to-end and fault tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from llmpod.backends import backends_from_env, read_state
from llmpod.pod import processes
from llmpod.pod.supervisor import MODEL_OF
from tests.support.e2e_harness import API_KEY, MODEL, FakeRunPod
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


class Models:
    """A directory with a pod_config.json holding two local mock models, chat and auto."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proxy_port, self.chat_port, self.auto_port = free_port(), free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "MOCK_", "PROXY_"))}
        self.env["RUNPOD_API_KEY"] = "rpa_must_not_reach_the_models"  # a child that needs no key gets none
        self.write()

    def entry(self, model: str, port: int, **more: Any) -> dict[str, Any]:
        return {
            "command": sys.executable,
            "args": ["-m", "llmpod.mock", "--model", model, "--port", str(port)],
            "endpoints": {"base_url": f"http://127.0.0.1:{port}/v1"},
            **more,
        }

    def write(self, **chat: Any) -> None:
        config = {
            "proxy_port": self.proxy_port,
            "cache_dir": str(self.path / "cache"),
            "watchdog_interval_seconds": 0.2,
            "llmModels": {
                "chat": self.entry("chat", self.chat_port, max_restarts=2, **chat),
                "auto": self.entry("auto", self.auto_port),
            },
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

    def record(self, model: str) -> dict[str, Any]:
        return json.loads((self.path / "pod_state.json").read_text())["models"][model]  # type: ignore[no-any-return]

    def state(self, model: str) -> Any:
        state = read_state(self.path / ".llmpod" / "models" / self.state_name(model))
        assert state is not None
        return state

    def state_name(self, model: str) -> str:
        return next(p.name for p in (self.path / ".llmpod" / "models").glob(f"{model}-*.state.json"))

    def answers(self, model: str, port: int) -> bool:
        try:
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                timeout=10,
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json()["model"] == model

    def ours(self) -> list[int]:
        return processes.find_by_environ(MODEL_OF, str(self.path))


@contextlib.contextmanager
def models_dir(path: Path, make: Callable[[Path], Models] = Models) -> Iterator[Models]:
    """A ``Models`` directory that is shut down, and its servers killed, whatever the test did."""
    work = make(path)
    try:
        yield work
    finally:
        work.run("--shutdown", "--all", timeout=60)
        for pid in work.ours():  # a failed test must not leak servers into the next one
            os.kill(pid, signal.SIGKILL)


class Mixed(Models):
    """``chat``: a local mock; ``big``: a RunPod pod on the fake."""

    def __init__(self, path: Path, fake: FakeRunPod) -> None:
        self.fake = fake
        super().__init__(path)
        self.env.update(
            RUNPOD_API_KEY=API_KEY,
            RUNPOD_API_BASE=fake.url,
            RUNPOD_POD_URL_TEMPLATE=f"{fake.url}/proxy/{{pod_id}}-{{port}}",
            HF_API_BASE="http://127.0.0.1:9",  # nobody there: the built-in catalog
        )

    def write(self, **big: Any) -> None:
        config = {
            "proxy_port": self.proxy_port,
            "cache_dir": str(self.path / "cache"),
            "watchdog_interval_seconds": 0.3,
            "gpu_type_id": "NVIDIA RTX A6000",
            "gpu_type_ids": ["NVIDIA L40S"],
            "ready_timeout_seconds": 60,
            "idle_timeout_seconds": 0,
            "llmModels": {
                "chat": self.entry("chat", self.chat_port),
                "big": {"modelStoreId": MODEL, "max_restarts": 1, **big},
            },
        }
        (self.path / "pod_config.json").write_text(json.dumps(config))

    def ask(self, model: str) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.proxy_port}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": os.urandom(4).hex()}], "max_tokens": 5},
            timeout=30,
        )

    def served(self, model: str) -> bool:
        try:
            return self.ask(model).status_code == 200
        except httpx.HTTPError:  # the proxy being restarted with a new pod
            return False

    def pod_record(self) -> dict[str, Any]:
        (state,) = (self.path / ".llmpod" / "pods").glob("big-*/pod_state.json")
        return json.loads(state.read_text())  # type: ignore[no-any-return]

    def proxy_backends(self) -> dict[str, Any]:
        pid = int((self.path / ".llmpod" / "proxy.pid").read_text())
        return {b.id: b for b in backends_from_env(processes.environ_value(pid, "PROXY_BACKENDS") or "")}
