"""What every backend shares: the pod's description (``PodSpec``), what a backend reports (``PodInfo``), the
``Provider`` protocol the lifecycle talks to, and the ``vllm serve`` arguments a pod is started with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmpod.pod.catalog_entries import GpuEntry, ModelEntry
from llmpod.pod.config import PodConfig
from llmpod.server_kind import MOCK, VLLM, ServerKind
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
    """A backend. The lifecycle asks the capability flags, never ``kind`` (which only names it in the state file)."""

    kind: str
    # tries the catalog's GPU types in turn (a local process has no GPU to choose)
    gpu_failover: bool
    # restarts a container that dies, so a pod reads RUNNING while vLLM crash-loops: its log tells
    reads_crash_loops: bool
    # the pod's newest log line is worth showing while it starts (a log stream to read, not our own mock's)
    shows_start_log: bool
    # a create that never answered may still make its pod some seconds later
    create_may_land_late: bool

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
    return [
        "--model",
        spec.model.hf_repo,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--served-model-name",
        spec.served_model,
        "--max-model-len",
        str(spec.max_model_len),
        *model_tool_args(spec.model, config),
        *config.vllm_args,
    ]


def model_tool_args(model: ModelEntry, config: PodConfig) -> list[str]:
    """The tool-calling flags a pod (or the local stand-in) serving ``model`` gets (see llmpod.tool_calling)."""
    return tool_args(model.tool_call_parser, model.chat_template, config.vllm_args)


def local_tool_args(model: ModelEntry, config: PodConfig) -> list[str]:
    """The tool-calling flags of a pod serving ``model`` with ``config.vllm_args``, whole, for the local mock
    (which gets no ``vllm_args``): the user's parser and template win over the catalog's, as on a pod."""
    parser = flag_value(config.vllm_args, TOOL_CALL_PARSER) or model.tool_call_parser
    template = flag_value(config.vllm_args, CHAT_TEMPLATE) or model.chat_template
    return tool_args(parser, template)


def upstream_kind(provider: str, config: PodConfig) -> ServerKind | None:
    """What the proxy's upstream is (its cache keys name it: llmpod/server_kind.py): vLLM on a RunPod pod, the
    bundled mock for a local run; None for a local ``command`` of the user's, which may be a real vLLM (the proxy
    then learns it from the server's first answer)."""
    if provider == "local":
        return None if config.command else MOCK
    return VLLM


def upstream_tool_calling(model: ModelEntry, config: PodConfig) -> bool | None:
    """Whether the pod answers requests with tools; None when we cannot know (a local command with its own args)."""
    if config.provider == "local" and config.args:
        return None
    return serves_tools(model.tool_call_parser, config.vllm_args)
