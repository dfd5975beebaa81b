"""What a container image needs of the host RunPod places it on: the CUDA floor of vLLM's images.

A pod's host reports ``cudaVersion``, the newest CUDA its driver runs. An image built against a newer CUDA cannot
start there (NVIDIA's base images set ``NVIDIA_REQUIRE_CUDA=cuda>=X.Y`` and the container runtime refuses them, e.g.
vllm issue #18813: "unsatisfied condition: cuda>=12.8" for v0.9.0), and RunPod restarts the container forever
while the pod reads RUNNING and bills. ``gpu.minCudaVersion`` on create (REST v2 ``CreateGpuConfig``, compared
numerically) keeps the pod off such hosts; the same floor scopes the catalog's availability (``minCudaVersion`` on
``GET /v2/catalog/gpus``).

The CUDA each ``vllm/vllm-openai`` release is built against, and the evidence:

- v0.8.x: 12.4. vllm 0.8.5's wheel pins torch==2.6.0 (PyPI's build of it is cu124).
- v0.9.x: 12.8. vllm 0.9.2's ``_C.abi3.so`` says "Cuda compilation tools, release 12.8" (torch==2.7.0); vllm
  issue #18813: the v0.9.0 image needs cuda>=12.8.
- v0.10.0 - v0.11.2: unknown. The Dockerfile's CUDA_VERSION default moved to 12.9.1 somewhere in these releases and
  which ones got it was not established, so they are left out (set ``min_cuda_version``).
- v0.12.0 - v0.19.1: 12.9. The 0.12.0 and 0.19.1 wheels' ``_C.abi3.so`` need ``libcudart.so.12`` and say
  "release 12.9" (V12.9.86 for 0.19.1).
- v0.20.0 - v0.34.0: 13.0. The 0.20.0 and 0.34.0 wheels need ``libcudart.so.13`` and say "release 13.0"; vllm
  issue #42738: "After v0.20.0, default wheel/docker nightly version is cu130"; docker/versions.json of that time
  has CUDA_VERSION 13.0.2. (Issue 14 said CUDA 13 from v0.27: the wheels show it from v0.20.)

A release tag with vLLM's CUDA suffix (``v0.21.0-cu129``: that release built against CUDA 12.9) states its floor.
Anything else (``latest``, ``nightly``, a digest, another repository, a release not in the table) is unknown: the
user states the floor with ``min_cuda_version`` in pod_config.json, rather than us guessing one that crash-loops.
"""

from __future__ import annotations

import re

from llmpod.errors import ConfigError

__all__ = ["KNOWN_TAGS", "VLLM_IMAGE", "cuda_floor", "image_cuda_floor"]

VLLM_IMAGE = "vllm/vllm-openai"
_RELEASES = {  # CUDA major.minor -> the vLLM releases (PyPI's list) whose image is built against it
    "12.4": "0.8.0 0.8.1 0.8.2 0.8.3 0.8.4 0.8.5 0.8.5.post1",
    "12.8": "0.9.0 0.9.0.1 0.9.1 0.9.2",
    "12.9": "0.12.0 0.13.0 0.14.0 0.14.1 0.15.0 0.15.1 0.16.0 0.17.0 0.17.1 0.18.0 0.18.1 0.19.0 0.19.1",
    "13.0": "0.20.0 0.20.1 0.20.2 0.21.0 0.22.0 0.22.1 0.23.0 0.24.0 0.25.0 0.25.1 0.26.0 0.27.0 0.27.1 0.28.0 "
    "0.29.0 0.30.0 0.31.0 0.32.0 0.33.0 0.34.0",
}
KNOWN_TAGS: dict[str, str] = {
    f"v{release}": cuda for cuda, releases in _RELEASES.items() for release in releases.split()
}
_CUDA_SUFFIX = re.compile(r"^(v\d+\.\d+\.\d+(?:\.post\d+|\.\d+)?)-cu(\d{2})(\d)$")  # v0.21.0-cu129 -> 12.9


def image_cuda_floor(image: str) -> str | None:
    """The ``minCudaVersion`` (``major.minor``) a known image needs, None for an image we do not know."""
    repo, _, tag = image.rpartition(":")
    if "@" in image or repo.removeprefix("docker.io/") != VLLM_IMAGE:
        return None
    suffixed = _CUDA_SUFFIX.match(tag)
    if suffixed:  # a release built against the CUDA its suffix names
        return f"{int(suffixed.group(2))}.{suffixed.group(3)}"
    return KNOWN_TAGS.get(tag)


def cuda_floor(image: str, override: str | None, source: str = "pod_config.json") -> str:
    """The CUDA floor a pod of ``image`` is created with: ``override`` (the config's ``min_cuda_version``) or the
    image's known floor. ``ConfigError`` when neither is known: a guess would either crash-loop on an old host or
    keep the pod off hosts it could use."""
    floor = override or image_cuda_floor(image)
    if floor is None:
        raise ConfigError(
            f"{source}: min_cuda_version is null and the CUDA that image {image!r} is built for is "
            'unknown; set min_cuda_version to it (major.minor, e.g. "12.9")'
        )
    return floor
