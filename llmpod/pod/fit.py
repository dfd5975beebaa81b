"""Will the model run where the pod is about to be put? Checked before anything is created or billed.

Three checks, each one line a user can act on:

* disk: vLLM downloads the weights onto the container disk; the weights plus ``DISK_HEADROOM_GB`` must fit
  ``container_disk_gb`` (the bf16 Qwen3-Coder-30B needs about 61 GB of weights: not on the 60 GB default);
* GPU memory: the weights, vLLM's runtime overhead and the KV cache for ``max_model_len`` tokens must fit the
  GPU's memory (times the GPU count) at vLLM's default ``--gpu-memory-utilization 0.9``;
* compute capability: each quantization method has a minimum in vLLM, and FP8 below capability 8.9 (Ampere)
  runs weight-only through vLLM's Marlin kernel: allowed, with a note saying so.

Sources, vLLM 0.33.0 (the wheel, read at these lines):

* vllm/config/vllm.py:930-935 refuses to start when the GPU's capability is under the method's
  ``get_min_capability()`` ("The quantization method ... is not supported for the current GPU");
* ``awq`` maps to ``AutoAWQConfig`` (vllm/model_executor/layers/quantization/__init__.py:157), whose minimum is 75
  (quantization/auto_awq.py:233-234); ``gptq`` to ``AutoGPTQConfig`` (__init__.py:168), 60
  (quantization/auto_gptq.py:182-183); ``fp8`` to ``Fp8Config`` (__init__.py:160), 75 (quantization/fp8.py:146-147);
* native FP8 needs 89 (vllm/platforms/cuda.py:587-588 ``supports_fp8``); below it, from 75
  (quantization/utils/marlin_utils_fp8.py:30-31), the FP8 Marlin kernel runs the weights as FP8 and computes in
  16 bits (vllm/model_executor/kernels/linear/scaled_mm/marlin.py:29-46), and vLLM warns that this "may degrade
  performance for compute-heavy workloads" (marlin_utils_fp8.py:108-113).

Compute capabilities of RunPod's GPU types: NVIDIA's CUDA GPUs table (developer.nvidia.com/cuda-gpus). A GPU type
that neither the table nor a family pattern knows is not checked for quantization.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

from llmpod.errors import ConfigError
from llmpod.pod.catalog_entries import GPU_MEMORY_UTILIZATION, RUNTIME_OVERHEAD_GB, GpuEntry, ModelEntry
from llmpod.pod.config import PodConfig

__all__ = [
    "COMPUTE_CAPABILITY",
    "DISK_HEADROOM_GB",
    "MIN_CAPABILITY",
    "NATIVE_FP8_CAPABILITY",
    "check_disk",
    "compute_capability",
    "gpu_note",
    "gpu_problem",
    "usable_gpus",
]

DISK_HEADROOM_GB = 5.0  # vLLM's own files, the Hub's download temporaries, logs: beside the weights
# vLLM 0.33.0 get_min_capability() per weight format of our catalog (sources above); bf16 has no minimum here
MIN_CAPABILITY = {"awq": 75, "gptq": 60, "fp8": 75}
NATIVE_FP8_CAPABILITY = 89
# major * 10 + minor, vLLM's DeviceCapability.to_int(), for RunPod GPU type ids (exact, as the v2 catalog spells them)
COMPUTE_CAPABILITY: dict[str, int] = {
    "Tesla V100-PCIE-16GB": 70,
    "Tesla V100-SXM2-16GB": 70,
    "Tesla V100-SXM2-32GB": 70,
    "Tesla V100-FHHL-16GB": 70,
    "NVIDIA A30": 80,
    "NVIDIA A100 80GB PCIe": 80,
    "NVIDIA A100-SXM4-80GB": 80,
    "NVIDIA A100-SXM4-40GB": 80,
    "NVIDIA GeForce RTX 3070": 86,
    "NVIDIA GeForce RTX 3080": 86,
    "NVIDIA GeForce RTX 3080 Ti": 86,
    "NVIDIA GeForce RTX 3090": 86,
    "NVIDIA GeForce RTX 3090 Ti": 86,
    "NVIDIA RTX A2000": 86,
    "NVIDIA RTX A4000": 86,
    "NVIDIA RTX A4500": 86,
    "NVIDIA RTX A5000": 86,
    "NVIDIA RTX A6000": 86,
    "NVIDIA A40": 86,
    "NVIDIA GeForce RTX 4070 Ti": 89,
    "NVIDIA GeForce RTX 4080": 89,
    "NVIDIA GeForce RTX 4080 SUPER": 89,
    "NVIDIA GeForce RTX 4090": 89,
    "NVIDIA L4": 89,
    "NVIDIA L40": 89,
    "NVIDIA L40S": 89,
    "NVIDIA RTX 2000 Ada Generation": 89,
    "NVIDIA RTX 4000 Ada Generation": 89,
    "NVIDIA RTX 4000 SFF Ada Generation": 89,
    "NVIDIA RTX 5000 Ada Generation": 89,
    "NVIDIA RTX 6000 Ada Generation": 89,
    "NVIDIA H100 PCIe": 90,
    "NVIDIA H100 80GB HBM3": 90,
    "NVIDIA H100 NVL": 90,
    "NVIDIA H200": 90,
    "NVIDIA H200 NVL": 90,
    "NVIDIA B200": 100,
    "NVIDIA GeForce RTX 5080": 120,
    "NVIDIA GeForce RTX 5090": 120,
    "NVIDIA RTX PRO 6000 Blackwell Server Edition": 120,
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition": 120,
}
# GPU types a refreshed catalog lists that the table does not: by family, from the id or display name
_FAMILIES = (
    (re.compile(r"\bV100\b"), 70),
    (re.compile(r"\bT4\b"), 75),
    (re.compile(r"\bA100\b|\bA30\b"), 80),
    (re.compile(r"\bRTX 30\d0\b|\bRTX A\d{4}\b|\bA40\b|\bA10G?\b"), 86),
    (re.compile(r"\bAda\b|\bRTX 40\d0\b|\bL4\b|\bL40S?\b"), 89),
    (re.compile(r"\bG?H[12]00\b"), 90),
    (re.compile(r"\bB[12]00\b"), 100),
    (re.compile(r"\bRTX 50\d0\b|\bBlackwell\b"), 120),
)
_ARCHITECTURES = {
    70: "Volta",
    75: "Turing",
    80: "Ampere",
    86: "Ampere",
    89: "Ada",
    90: "Hopper",
    100: "Blackwell",
    120: "Blackwell",
}


def compute_capability(gpu: GpuEntry) -> int | None:
    """The GPU type's compute capability as major * 10 + minor, or None when we do not know it."""
    if gpu.id in COMPUTE_CAPABILITY:
        return COMPUTE_CAPABILITY[gpu.id]
    for pattern, capability in _FAMILIES:
        if pattern.search(gpu.id) or pattern.search(gpu.name):
            return capability
    return None


def _shown(capability: int) -> str:
    name = _ARCHITECTURES.get(capability)
    return f"compute capability {capability // 10}.{capability % 10}" + (f", {name}" if name else "")


def check_disk(model: ModelEntry, config: PodConfig) -> None:
    """A one-line ``ConfigError`` unless the model's weights and some headroom fit ``container_disk_gb``."""
    weights = model.estimated_weights_gb
    need = math.ceil(weights + DISK_HEADROOM_GB)
    if need > config.container_disk_gb:
        raise ConfigError(
            f"model {model.id} needs about {need} GB of container disk ({weights:.0f} GB of weights + "
            f"{DISK_HEADROOM_GB:g} GB headroom), but container_disk_gb is {config.container_disk_gb}: "
            f"set container_disk_gb to at least {need} in pod_config.json"
        )


def gpu_problem(model: ModelEntry, gpu: GpuEntry, max_model_len: int, count: int = 1) -> str | None:
    """Why ``model`` cannot serve ``max_model_len`` tokens on ``count`` x ``gpu`` (one line), or None if it can."""
    capability = compute_capability(gpu)
    minimum = MIN_CAPABILITY.get(model.quantization or "")
    if capability is not None and minimum is not None and capability < minimum:
        return (
            f"vLLM 0.33 runs {model.quantization.upper() if model.quantization else 'bf16'} weights from compute "
            f"capability {minimum // 10}.{minimum % 10}; {gpu.id} has {_shown(capability)}"
        )
    weights = model.estimated_weights_gb
    kv_gb = model.kv_cache_kib_per_token * 1024 * max_model_len / 1e9
    need = weights + RUNTIME_OVERHEAD_GB * count + kv_gb
    usable = gpu.memory_gb * count * GPU_MEMORY_UTILIZATION
    if need > usable:
        memory = f"{count} x {gpu.memory_gb} GB" if count > 1 else f"{gpu.memory_gb} GB"
        return (
            f"model {model.id} needs about {need / GPU_MEMORY_UTILIZATION:.0f} GB of GPU memory ({weights:.0f} GB "
            f"of weights + {kv_gb:.1f} GB of KV cache for max_model_len={max_model_len}); {gpu.id} has {memory}"
        )
    return None


def gpu_note(model: ModelEntry, gpu: GpuEntry) -> str | None:
    """What vLLM does differently for ``model`` on ``gpu`` that the user should know, or None."""
    capability = compute_capability(gpu)
    if model.quantization != "fp8" or capability is None or capability >= NATIVE_FP8_CAPABILITY:
        return None
    return (
        f"note: {gpu.id} ({_shown(capability)}) has no FP8 hardware: vLLM 0.33 runs {model.id} weight-only "
        "through its FP8 Marlin kernel (weights stay FP8, the maths is 16-bit; slower on long prompts)"
    )


def usable_gpus(
    config: PodConfig, model: ModelEntry, gpus: Iterable[GpuEntry], say: Callable[[str], None] | None = None
) -> list[GpuEntry]:
    """The candidates ``model`` fits, in order; each one skipped is said with its reason. A one-line
    ``ConfigError`` when the disk is too small or no candidate is left: nothing has been created then."""
    check_disk(model, config)
    max_model_len = config.max_model_len or model.context_length
    usable, refused = [], []
    for gpu in gpus:
        problem = gpu_problem(model, gpu, max_model_len)
        if problem is None:
            usable.append(gpu)
            continue
        refused.append(f"{gpu.id}: {problem}")
        if say is not None:
            say(f"GPU {gpu.id} skipped: {problem}")
    if not usable:
        raise ConfigError(
            f"no GPU candidate can serve model {model.id}: " + "; ".join(refused)
            if refused
            else "no GPU type to try: set gpu_type_id in pod_config.json"
        )
    return usable
