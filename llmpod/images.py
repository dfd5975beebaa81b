"""What a container image needs of the host RunPod places it on: the CUDA floor of vLLM's images.

A pod's host reports ``cudaVersion``, the newest CUDA its driver runs. An image built against a newer CUDA cannot
start there, and RunPod restarts the container forever while the pod reads RUNNING and bills. ``gpu.minCudaVersion``
on create (REST v2 ``CreateGpuConfig``, compared numerically) keeps the pod off such hosts.
"""

from __future__ import annotations

__all__ = ["VLLM_IMAGE", "image_cuda_floor"]

VLLM_IMAGE = "vllm/vllm-openai"
CUDA13_FROM = (0, 27)  # vllm/vllm-openai from v0.27 on is built against CUDA 13 (libcudart.so.13)


def image_cuda_floor(image: str) -> str | None:
    """The ``minCudaVersion`` a known image needs, None for an image we do not know."""
    repo, _, tag = image.rpartition(":")
    parts = tag.removeprefix("v").split(".")
    if repo != VLLM_IMAGE or len(parts) < 2 or not all(part.isdigit() for part in parts[:2]):
        return None
    return "13.0" if (int(parts[0]), int(parts[1])) >= CUDA13_FROM else None
