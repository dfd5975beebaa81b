"""Where the pod runs: on RunPod (REST v2, ``runpod``), or as a local process that stands in for it (``local``).

Both give the lifecycle the same small surface (``Provider``): create, get, find by name, list ours, terminate,
logs, and the capabilities the lifecycle asks about instead of the backend's name.
"""

from __future__ import annotations

from llmpod.pod.providers.base import (
    LIVE_STATUSES,
    REPO_ROOT,
    VLLM_PORT,
    PodInfo,
    PodSpec,
    Provider,
    local_tool_args,
    model_tool_args,
    upstream_kind,
    upstream_tool_calling,
    vllm_args,
)
from llmpod.pod.providers.local import LocalProvider
from llmpod.pod.providers.runpod import RunPodProvider
from llmpod.pod.providers.runpod_api import DEFAULT_API_BASE, POD_URL_TEMPLATE, RunPodClient
from llmpod.pod.providers.runpod_models import CreatePodRequest, GpuRequest, GpuType, Pod

__all__ = [
    "DEFAULT_API_BASE",
    "LIVE_STATUSES",
    "POD_URL_TEMPLATE",
    "REPO_ROOT",
    "VLLM_PORT",
    "CreatePodRequest",
    "GpuRequest",
    "GpuType",
    "LocalProvider",
    "Pod",
    "PodInfo",
    "PodSpec",
    "Provider",
    "RunPodClient",
    "RunPodProvider",
    "local_tool_args",
    "model_tool_args",
    "upstream_kind",
    "upstream_tool_calling",
    "vllm_args",
]
