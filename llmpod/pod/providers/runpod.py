"""The pod on RunPod (REST v2): the lifecycle's create/get/list/terminate/logs over ``RunPodClient``."""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator

from llmpod.pod.config import PodConfig
from llmpod.pod.images import cuda_floor
from llmpod.pod.providers.base import VLLM_PORT, PodInfo, PodSpec, vllm_args
from llmpod.pod.providers.runpod_api import RunPodClient
from llmpod.pod.providers.runpod_models import CreatePodRequest, GpuRequest, Pod
from llmpod.pod.state import POD_NAME_PREFIX


class RunPodProvider:
    kind = "runpod"
    gpu_failover = True
    reads_crash_loops = True
    shows_start_log = True
    create_may_land_late = True

    def __init__(self, client: RunPodClient, config: PodConfig, url_template: str) -> None:
        self.client = client
        self.config = config
        self.url_template = url_template

    def url(self, pod_id: str) -> str:
        return self.url_template.format(pod_id=pod_id, port=VLLM_PORT).rstrip("/") + "/v1"

    def _info(self, pod: Pod) -> PodInfo:
        return PodInfo(
            pod.id, pod.name, pod.status, pod.cost_per_hour, pod.gpu_id, pod.uptime_seconds, self.url(pod.id)
        )

    def check_access(self) -> None:
        self.client.check_key()

    def create(self, spec: PodSpec) -> PodInfo:
        assert spec.gpu is not None
        env = {"VLLM_API_KEY": spec.api_key}
        hf_token = os.environ.get(self.config.hf_token_env)
        if hf_token:
            env["HF_TOKEN"] = hf_token
        request = CreatePodRequest(
            name=spec.name,
            image=self.config.image,
            templateId=self.config.template_id,
            args=shlex.join(vllm_args(spec, self.config)),
            disk=self.config.container_disk_gb,
            env=env,
            ports=[f"{VLLM_PORT}/http"],
            cloud=self.config.cloud_type,
            gpu=GpuRequest(
                id=spec.gpu.id, count=1, minCudaVersion=cuda_floor(self.config.image, self.config.min_cuda_version)
            ),
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
