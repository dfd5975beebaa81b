"""Where the pod runs: on RunPod (REST v2), or as a local process that stands in for it (``--local``).

Both give the lifecycle the same small surface: create, get, find by name, list ours, terminate, logs.
A local "pod" carries its name and port in its environment, so a leaked one is found again like a RunPod
pod is: by our name prefix.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmpod.errors import PodError
from llmpod.pod import processes
from llmpod.pod.catalog import GpuEntry, ModelEntry
from llmpod.pod.config import PodConfig
from llmpod.pod.images import cuda_floor
from llmpod.pod.providers.runpod_api import CreatePodRequest, GpuRequest, Pod, RunPodClient
from llmpod.pod.state import POD_NAME_PREFIX
from llmpod.tool_calling import CHAT_TEMPLATE, TOOL_CALL_PARSER, flag_value, serves_tools, tool_args

VLLM_PORT = 8000
LIVE_STATUSES = ("PROVISIONING", "STARTING", "RUNNING")
REPO_ROOT = Path(__file__).resolve().parents[3]  # llmpod/pod/providers/base.py -> the checkout


@dataclass(frozen=True)
class PodInfo:
    id: str
    name: str
    status: str
    cost_per_hour: float
    gpu_id: str | None
    uptime_seconds: int | None
    url: str  # OpenAI base URL, …/v1

    @property
    def alive(self) -> bool:
        """Allocated and possibly billing (not exited, errored or terminated)."""
        return self.status in LIVE_STATUSES

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"


@dataclass(frozen=True)
class PodSpec:
    name: str
    gpu: GpuEntry | None
    model: ModelEntry
    served_model: str
    max_model_len: int
    api_key: str


class Provider(Protocol):
    kind: str

    def check_access(self) -> None: ...
    def create(self, spec: PodSpec) -> PodInfo: ...
    def get(self, pod_id: str) -> PodInfo | None: ...
    def find_by_name(self, name: str) -> PodInfo | None: ...
    def list_ours(self) -> list[PodInfo]: ...
    def terminate(self, pod_id: str) -> bool: ...
    def logs(self, pod_id: str, tail: int) -> list[str]: ...
    def follow_logs(self, pod_id: str) -> Iterator[str]: ...
    def close(self) -> None: ...


def vllm_args(spec: PodSpec, config: PodConfig, port: int = VLLM_PORT) -> list[str]:
    """``vllm serve`` arguments: bind 0.0.0.0 (RunPod's proxy cannot reach 127.0.0.1), serve under our id, with
    the model's tool calling on (agents send tools on every turn), then the user's ``vllm_args``."""
    return ["--model", spec.model.hf_repo, "--host", "0.0.0.0", "--port", str(port),
            "--served-model-name", spec.served_model, "--max-model-len", str(spec.max_model_len),
            *model_tool_args(spec.model, config), *config.vllm_args]


def model_tool_args(model: ModelEntry, config: PodConfig) -> list[str]:
    """The tool-calling flags a pod (or the local stand-in) serving ``model`` gets (see llmpod.tool_calling)."""
    return tool_args(model.tool_call_parser, model.chat_template, config.vllm_args)


def local_tool_args(model: ModelEntry, config: PodConfig) -> list[str]:
    """The tool-calling flags of a pod serving ``model`` with ``config.vllm_args``, whole, for the local mock
    (which gets no ``vllm_args``): the user's parser and template win over the catalog's, as on a pod."""
    parser = flag_value(config.vllm_args, TOOL_CALL_PARSER) or model.tool_call_parser
    template = flag_value(config.vllm_args, CHAT_TEMPLATE) or model.chat_template
    return tool_args(parser, template)


def upstream_tool_calling(model: ModelEntry, config: PodConfig) -> bool | None:
    """Whether the pod answers requests with tools; None when we cannot know (a local command with its own args)."""
    if config.provider == "local" and config.args:
        return None
    return serves_tools(model.tool_call_parser, config.vllm_args)


class RunPodProvider:
    kind = "runpod"

    def __init__(self, client: RunPodClient, config: PodConfig, url_template: str) -> None:
        self.client = client
        self.config = config
        self.url_template = url_template

    def url(self, pod_id: str) -> str:
        return self.url_template.format(pod_id=pod_id, port=VLLM_PORT).rstrip("/") + "/v1"

    def _info(self, pod: Pod) -> PodInfo:
        return PodInfo(pod.id, pod.name, pod.status, pod.cost_per_hour, pod.gpu_id, pod.uptime_seconds,
                       self.url(pod.id))

    def check_access(self) -> None:
        self.client.check_key()

    def create(self, spec: PodSpec) -> PodInfo:
        assert spec.gpu is not None
        env = {"VLLM_API_KEY": spec.api_key}
        hf_token = os.environ.get(self.config.hf_token_env)
        if hf_token:
            env["HF_TOKEN"] = hf_token
        request = CreatePodRequest(
            name=spec.name, image=self.config.image, templateId=self.config.template_id,
            args=shlex.join(vllm_args(spec, self.config)), disk=self.config.container_disk_gb, env=env,
            ports=[f"{VLLM_PORT}/http"], cloud=self.config.cloud_type,
            gpu=GpuRequest(id=spec.gpu.id, count=1,
                           minCudaVersion=cuda_floor(self.config.image, self.config.min_cuda_version)),
        )
        return self._info(self.client.create_pod(request))

    def get(self, pod_id: str) -> PodInfo | None:
        pod = self.client.get_pod(pod_id)
        return None if pod is None or pod.gone else self._info(pod)

    def find_by_name(self, name: str) -> PodInfo | None:
        return next((p for p in self.list_ours() if p.name == name), None)

    def list_ours(self) -> list[PodInfo]:
        return [self._info(p) for p in self.client.list_pods() if p.name.startswith(POD_NAME_PREFIX) and not p.gone]

    def terminate(self, pod_id: str) -> bool:
        return self.client.delete_pod(pod_id)

    def logs(self, pod_id: str, tail: int) -> list[str]:
        return self.client.pod_logs(pod_id, tail=tail)

    def follow_logs(self, pod_id: str) -> Iterator[str]:
        return self.client.follow_logs(pod_id)

    def close(self) -> None:
        self.client.close()


class LocalProvider:
    """A local OpenAI-compatible process as the "pod": by default the mock vLLM server."""

    kind = "local"
    NAME_VAR = "LLMPOD_POD_NAME"
    PORT_VAR = "LLMPOD_POD_PORT"
    START_MARK = "llmpod: starting local pod "  # written to the shared log before each process: logs() start there

    def __init__(self, config: PodConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path

    def check_access(self) -> None:
        return None

    def create(self, spec: PodSpec) -> PodInfo:
        port = _free_port()
        env = {**os.environ, **self.config.env, "VLLM_API_KEY": spec.api_key, self.NAME_VAR: spec.name,
               self.PORT_VAR: str(port)}
        argv = self._argv(spec, port)
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as log:
            log.write(f"{self.START_MARK}{spec.name}\n")
        pid = processes.spawn_detached(argv, env=env, log_path=self.log_path, pid_path=None)
        return PodInfo(f"local-{pid}-{port}", spec.name, "RUNNING", 0.0, None, None, f"http://127.0.0.1:{port}/v1")

    def _argv(self, spec: PodSpec, port: int) -> list[str]:
        command = self.config.command or processes.python_module("llmpod.mock")
        template = self.config.args or ["--host", "127.0.0.1", "--port", "{port}", "--model", "{model}",
                                        "--served-model-name", "{served_model_name}",
                                        "--max-model-len", "{max_model_len}"]
        values = {"port": port, "model": spec.model.hf_repo, "served_model_name": spec.served_model,
                  "max_model_len": spec.max_model_len}
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
                found.append(PodInfo(f"local-{pid}-{port}", name, "RUNNING", 0.0, None, None,
                                     f"http://127.0.0.1:{port}/v1"))
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
        return text[max(text.rfind(self.START_MARK), 0):].splitlines()[-tail:]

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parse_local_id(pod_id: str) -> tuple[int | None, int]:
    parts = pod_id.split("-")
    if len(parts) != 3 or parts[0] != "local" or not parts[1].isdigit() or not parts[2].isdigit():
        return None, 0
    return int(parts[1]), int(parts[2])
