"""A local process as the "pod" (``--local``): by default the mock vLLM server.

A local "pod" carries its name and port in its environment, so a leaked one is found again like a RunPod
pod is: by our name prefix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from llmpod._net import free_port
from llmpod.errors import PodError
from llmpod.pod import processes
from llmpod.pod.config import PodConfig
from llmpod.pod.providers.base import PodInfo, PodSpec, local_tool_args
from llmpod.pod.state import POD_NAME_PREFIX


class LocalProvider:
    """A local OpenAI-compatible process as the "pod": by default the mock vLLM server."""

    kind = "local"
    gpu_failover = False
    reads_crash_loops = False  # the process is not restarted: a crash ends it, and the wait sees it gone
    shows_start_log = False
    create_may_land_late = False  # the process is spawned before create returns
    NAME_VAR = "LLMPOD_POD_NAME"
    PORT_VAR = "LLMPOD_POD_PORT"
    START_MARK = "llmpod: starting local pod "  # written to the shared log before each process: logs() start there

    def __init__(self, config: PodConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path

    def check_access(self) -> None:
        return None

    def create(self, spec: PodSpec) -> PodInfo:
        port = free_port()
        env = {
            **self.inherited_env(),
            **self.config.env,
            "VLLM_API_KEY": spec.api_key,
            self.NAME_VAR: spec.name,
            self.PORT_VAR: str(port),
        }
        argv = self._argv(spec, port)
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as log:
            log.write(f"{self.START_MARK}{spec.name}\n")
        pid = processes.spawn_detached(argv, env=env, log_path=self.log_path, pid_path=None)
        return PodInfo(f"local-{pid}-{port}", spec.name, "RUNNING", 0.0, None, None, f"http://127.0.0.1:{port}/v1")

    def inherited_env(self) -> dict[str, str]:
        """What the process inherits of our environment: never the RunPod key or the proxy's keys. The bundled mock
        downloads nothing and uses no secret but its VLLM_API_KEY (set in ``create``); a ``command`` of the
        user's (a real vLLM) keeps the Hugging Face token a pod would get, and the rest of the user's variables."""
        if self.config.command:
            return processes.child_env(os.environ, keep=(self.config.hf_token_env,), by_name=False)
        return processes.child_env(os.environ, secrets=(self.config.hf_token_env,))

    def _argv(self, spec: PodSpec, port: int) -> list[str]:
        command = self.config.command or processes.python_module("llmpod.mock")
        template = self.config.args or [
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--model",
            "{model}",
            "--served-model-name",
            "{served_model_name}",
            "--max-model-len",
            "{max_model_len}",
        ]
        values = {
            "port": port,
            "model": spec.model.hf_repo,
            "served_model_name": spec.served_model,
            "max_model_len": spec.max_model_len,
        }
        # the default template is `vllm serve`'s own flags: it gets the tool flags a real pod would get. The mock
        # never sees vllm_args, so a parser or template named there goes in here, not beside them as on a pod
        tools = [] if self.config.args else local_tool_args(spec.model, self.config)
        try:
            return [*command, *(arg.format(**values) for arg in template), *tools]
        except (KeyError, IndexError, ValueError) as exc:
            raise PodError(f"pod_config.json: bad placeholder in local args: {exc}") from None

    def get(self, pod_id: str) -> PodInfo | None:
        pid, port = _parse_local_id(pod_id)
        if pid is None or not processes.alive(pid):
            return None
        name = processes.environ_value(pid, self.NAME_VAR)
        if name is None:
            return None  # that pid now belongs to something else
        return PodInfo(pod_id, name, "RUNNING", 0.0, None, None, f"http://127.0.0.1:{port}/v1")

    def find_by_name(self, name: str) -> PodInfo | None:
        return next((p for p in self.list_ours() if p.name == name), None)

    def list_ours(self) -> list[PodInfo]:
        found = []
        for pid in processes.find_by_environ(self.NAME_VAR):
            name = processes.environ_value(pid, self.NAME_VAR) or ""
            port = processes.environ_value(pid, self.PORT_VAR) or "0"
            if name.startswith(POD_NAME_PREFIX) and port.isdigit():
                found.append(
                    PodInfo(f"local-{pid}-{port}", name, "RUNNING", 0.0, None, None, f"http://127.0.0.1:{port}/v1")
                )
        return found

    def terminate(self, pod_id: str) -> bool:
        pid, _ = _parse_local_id(pod_id)
        if pid is None or self.get(pod_id) is None:
            return False
        if not processes.stop(pid, grace=10):
            raise PodError(f"local pod process {pid} did not exit; kill it with `kill -9 {pid}`")
        return True

    def logs(self, pod_id: str, tail: int) -> list[str]:
        """The newest pod's lines: the log file is kept across pods, and an older one's error must not be shown."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return text[max(text.rfind(self.START_MARK), 0) :].splitlines()[-tail:]

    def follow_logs(self, pod_id: str) -> Iterator[str]:
        with open(self.log_path, errors="replace") as handle:
            yield from (line.rstrip("\n") for line in handle.readlines()[-100:])
            while self.get(pod_id) is not None:
                line = handle.readline()
                if line:
                    yield line.rstrip("\n")
                else:
                    time.sleep(0.2)

    def close(self) -> None:
        return None


def _parse_local_id(pod_id: str) -> tuple[int | None, int]:
    parts = pod_id.split("-")
    if len(parts) != 3 or parts[0] != "local" or not parts[1].isdigit() or not parts[2].isdigit():
        return None, 0
    return int(parts[1]), int(parts[2])
