"""The Model Store's two entry kinds, ``ModelEntry`` and ``GpuEntry``, and the sizing figures they share.

Memory figures are estimates for one GPU with vLLM's default ``--gpu-memory-utilization 0.9``: weights, about
2 GB of activations and CUDA graphs, then the KV cache (``kv_cache_kib_per_token`` x tokens, bf16).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
RUNTIME_OVERHEAD_GB = 2.0  # activations, CUDA graphs, non-torch memory
BYTES_PER_PARAMETER = {None: 2.0, "fp8": 1.05, "awq": 0.6, "gptq": 0.6}  # incl. scales and 16-bit embeddings


class ModelEntry(BaseModel):
    """A model of the store: where its weights are and what it needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="The modelStoreId users write in pod_config.json")
    name: str = Field(description="Display name")
    hf_repo: str = Field(description="The Hugging Face repo vLLM's --model gets")
    parameters_b: float = Field(gt=0, description="Billions of parameters (all experts for a mixture of experts)")
    quantization: Literal["awq", "gptq", "fp8"] | None = Field(description="Weight format; None = bf16")
    min_gpu_memory_gb: int = Field(gt=0, description="Smallest single GPU that serves context_length tokens")
    context_length: int = Field(gt=0, description="Context (tokens) served by default: fits min_gpu_memory_gb")
    max_context_length: int = Field(gt=0, description="The model's own limit (max_position_embeddings)")
    kv_cache_kib_per_token: float = Field(gt=0, description="KV cache per token of context, bf16, in KiB")
    gated: bool = Field(False, description="Hugging Face asks users to accept terms: the pod needs a token")
    weights_gb: float | None = Field(None, description="Size of the weights in GB, when the Hub told us")
    aliases: tuple[str, ...] = Field((), description="Other names accepted for this model")
    tool_call_parser: str | None = Field(None, description="vLLM's --tool-call-parser; None = no tool calling")
    chat_template: str | None = Field(
        None,
        description="vLLM's --chat-template (a path in the image), only where "
        "the model's own template does not render tools",
    )
    tool_calling_source: str = Field("", description="Where the two facts above come from (vLLM file, version)")

    @property
    def tool_calling(self) -> bool:
        """vLLM can answer requests with tools (agents such as Kilo Code) for this model."""
        return self.tool_call_parser is not None

    def names(self) -> tuple[str, ...]:
        """Every name this model answers to (id, repo, the repo's last part, aliases)."""
        return (self.id, self.hf_repo, self.hf_repo.rsplit("/", 1)[-1], *self.aliases)

    @property
    def estimated_weights_gb(self) -> float:
        """The Hub's figure when known, else parameters x bytes per parameter for the format."""
        if self.weights_gb is not None:
            return self.weights_gb
        return self.parameters_b * BYTES_PER_PARAMETER[self.quantization]

    def max_tokens_on(self, memory_gb: float) -> int:
        """About how many tokens of KV cache fit on a GPU with ``memory_gb`` (0 if not even the weights do)."""
        free_gb = memory_gb * GPU_MEMORY_UTILIZATION - self.estimated_weights_gb - RUNTIME_OVERHEAD_GB
        return max(0, int(free_gb * 1e9 / (self.kv_cache_kib_per_token * 1024)))


class GpuEntry(BaseModel):
    """A RunPod GPU type. Prices are USD per hour for one GPU, None when unknown."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, description="RunPod's GPU type id (what pod creation takes)")
    name: str = Field(description="Display name")
    memory_gb: int = Field(gt=0, description="VRAM in GB")
    price_secure: float | None = None
    price_community: float | None = None
    availability: str | None = Field(None, description="NONE/LOW/MEDIUM/HIGH from RunPod; None if unknown")

    def price(self, cloud_type: str) -> float | None:
        """The list price per hour on ``cloud_type`` (``SECURE``/``COMMUNITY``); None if unknown or not offered."""
        price = self.price_secure if cloud_type.upper() == "SECURE" else self.price_community
        return price if price is not None and price > 0 else None
