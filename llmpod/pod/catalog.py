"""Our "Model Store": the coding models manage_pod.py knows how to serve, and the GPUs to serve them on.

RunPod has no model store for pods (vLLM downloads the weights from Hugging Face when the pod starts), so the
store is ours: ``BUILTIN_MODELS`` lists models we checked, with what they need, and ``BUILTIN_GPUS`` lists common
RunPod GPU types (exact v2 ids). ``catalog_refresh`` asks RunPod for its GPU list (prices, stock) and the
Hugging Face Hub for each model's gated flag and weight size, and caches the result; ``load_catalog`` reads that
cache, or falls back to the built-in lists. ``validate_config`` checks a ``PodConfig`` against the catalog.

Memory figures are estimates for one GPU with vLLM's default ``--gpu-memory-utilization 0.9``: weights, about
2 GB of activations and CUDA graphs, then the KV cache (``kv_cache_kib_per_token`` x tokens, bf16).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmpod.errors import ConfigError
from llmpod.pod.config import PodConfig

log = logging.getLogger(__name__)

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
RUNTIME_OVERHEAD_GB = 2.0  # activations, CUDA graphs, non-torch memory
BYTES_PER_PARAMETER = {None: 2.0, "fp8": 1.05, "awq": 0.6, "gptq": 0.6}  # incl. scales and 16-bit embeddings
# The cache holds only what refreshes (Hub figures, GPU prices): every other model fact, tool calling included,
# comes from BUILTIN_MODELS when it is read (_merge_models), so entries cached before a fact existed stay valid.
CACHE_VERSION = 1


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


def _m(
    id: str,
    name: str,
    repo: str,
    params: float,
    quant: Literal["awq", "gptq", "fp8"] | None,
    min_gb: int,
    ctx: int,
    max_ctx: int,
    kv_kib: float,
    *aliases: str,
    tools: tuple[str | None, str],
) -> ModelEntry:
    return ModelEntry(
        id=id,
        name=name,
        hf_repo=repo,
        parameters_b=params,
        quantization=quant,
        min_gpu_memory_gb=min_gb,
        context_length=ctx,
        max_context_length=max_ctx,
        kv_cache_kib_per_token=kv_kib,
        aliases=aliases,
        tool_call_parser=tools[0],
        tool_calling_source=tools[1],
    )


# Tool calling (parser, source). None of these models needs a --chat-template of vLLM's examples: the Qwen ones
# render tools with their own template, the others have no tool calling at all. Parser names: vLLM 0.33.0's
# registry, vllm/tool_parsers/__init__.py; which model takes which: vLLM's docs/features/tool_calling.md.
_DOCS = "vLLM docs/features/tool_calling.md"
_HERMES = (
    "hermes",
    f"{_DOCS}, 'Qwen Models': Qwen/Qwen2.5-* use hermes with their own chat template; "
    "vLLM 0.33.0 vllm/tool_parsers/__init__.py: hermes = Hermes2ProToolParser",
)
_QWEN3_CODER = (
    "qwen3_coder",
    f"{_DOCS}, 'Qwen3-Coder Models': Qwen/Qwen3-Coder-30B-A3B-Instruct (as qwen3_xml); "
    "vLLM 0.33.0 vllm/tool_parsers/__init__.py: qwen3_coder and qwen3_xml are both "
    "Qwen3EngineToolParser",
)
_DEEPSEEK_V1 = (
    None,
    f"no vLLM 0.33.0 parser or {_DOCS} entry for DeepSeek Coder v1; its chat template "
    "(### Instruction / ### Response) renders no tools",
)
_DEEPSEEK_V2 = (
    None,
    f"{_DOCS} names deepseek_v3 for DeepSeek-V3-0324/R1-0528 only, and vLLM 0.33.0's "
    "DeepSeekV3ToolParser needs their tool-call tokens; Coder V2's chat template renders no tools",
)
_CODELLAMA = (
    None,
    f"no vLLM 0.33.0 parser for Llama 2's [INST] format ({_DOCS}: llama3_json is for Llama 3.1+); "
    "Code Llama's chat template renders no tools",
)


# KV KiB/token = layers x KV heads x head dim x 2 (K and V) x 2 bytes / 1024 (MLA: layers x 576 x 2 / 1024)
BUILTIN_MODELS: tuple[ModelEntry, ...] = (
    _m(
        "deepseek-coder-33b-instruct-awq",
        "DeepSeek Coder 33B Instruct (AWQ)",
        "TheBloke/deepseek-coder-33B-instruct-AWQ",
        33.3,
        "awq",
        48,
        16384,
        16384,
        248,
        "deepseek-coder-33b-awq",
        "deepseek-ai/deepseek-coder-33b-awq",
        tools=_DEEPSEEK_V1,
    ),
    _m(
        "deepseek-coder-6.7b-instruct",
        "DeepSeek Coder 6.7B Instruct",
        "deepseek-ai/deepseek-coder-6.7b-instruct",
        6.74,
        None,
        24,
        8192,
        16384,
        512,
        tools=_DEEPSEEK_V1,
    ),
    _m(
        "deepseek-coder-v2-lite-instruct",
        "DeepSeek Coder V2 Lite Instruct (16B MoE)",
        "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct",
        15.7,
        None,
        48,
        32768,
        163840,
        30.375,
        tools=_DEEPSEEK_V2,
    ),
    _m(
        "qwen2.5-coder-7b-instruct",
        "Qwen2.5 Coder 7B Instruct",
        "Qwen/Qwen2.5-Coder-7B-Instruct",
        7.62,
        None,
        24,
        32768,
        32768,
        56,
        tools=_HERMES,
    ),
    _m(
        "qwen2.5-coder-14b-instruct-awq",
        "Qwen2.5 Coder 14B Instruct (AWQ)",
        "Qwen/Qwen2.5-Coder-14B-Instruct-AWQ",
        14.7,
        "awq",
        24,
        32768,
        32768,
        192,
        tools=_HERMES,
    ),
    _m(
        "qwen2.5-coder-32b-instruct-awq",
        "Qwen2.5 Coder 32B Instruct (AWQ)",
        "Qwen/Qwen2.5-Coder-32B-Instruct-AWQ",
        32.8,
        "awq",
        48,
        32768,
        32768,
        256,
        tools=_HERMES,
    ),
    _m(
        "qwen3-coder-30b-a3b-instruct-fp8",
        "Qwen3 Coder 30B-A3B Instruct (FP8)",
        "Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8",
        30.5,
        "fp8",
        48,
        65536,
        262144,
        96,
        tools=_QWEN3_CODER,
    ),
    _m(
        "qwen3-coder-30b-a3b-instruct",
        "Qwen3 Coder 30B-A3B Instruct",
        "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        30.5,
        None,
        80,
        65536,
        262144,
        96,
        tools=_QWEN3_CODER,
    ),
    _m(
        "codellama-13b-instruct-awq",
        "Code Llama 13B Instruct (AWQ)",
        "TheBloke/CodeLlama-13B-Instruct-AWQ",
        13.0,
        "awq",
        24,
        8192,
        16384,
        800,
        tools=_CODELLAMA,
    ),
)


def _g(id: str, name: str, memory_gb: int) -> GpuEntry:
    return GpuEntry(id=id, name=name, memory_gb=memory_gb)


BUILTIN_GPUS: tuple[GpuEntry, ...] = (
    _g("NVIDIA GeForce RTX 4090", "RTX 4090", 24),
    _g("NVIDIA GeForce RTX 3090", "RTX 3090", 24),
    _g("NVIDIA RTX A5000", "RTX A5000", 24),
    _g("NVIDIA L4", "L4", 24),
    _g("NVIDIA RTX A6000", "RTX A6000", 48),
    _g("NVIDIA A40", "A40", 48),
    _g("NVIDIA L40S", "L40S", 48),
    _g("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada", 48),
    _g("NVIDIA A100 80GB PCIe", "A100 PCIe", 80),
    _g("NVIDIA A100-SXM4-80GB", "A100 SXM", 80),
    _g("NVIDIA H100 PCIe", "H100 PCIe", 80),
    _g("NVIDIA H100 80GB HBM3", "H100 SXM", 80),
    _g("NVIDIA H200", "H200 SXM", 141),
)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _unknown(what: str, query: str, names: Mapping[str, str], listing: list[str]) -> ConfigError:
    """A one-line error for an unknown name: close matches (names holding every word of it, else difflib's), or
    what exists."""
    key = _norm(query)
    words = [word for word in re.split(r"[\s\-_/.:]+", key) if word]
    close = [target for name, target in names.items() if words and all(word in name for word in words)]
    close = close or [names[name] for name in difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)]
    close = list(dict.fromkeys(close))
    if close:
        shown = " or ".join(repr(name) for name in close[:3])
        shown += f" or one of {len(close) - 3} more" if close[3:] else ""
        return ConfigError(f"unknown {what} {query!r}: did you mean {shown}?")
    more = ", ..." if len(listing) > 10 else ""
    return ConfigError(f"unknown {what} {query!r}; known: {', '.join(listing[:10])}{more}")


class Catalog(BaseModel):
    """The models and GPUs manage_pod.py can use, and where each list came from."""

    models: list[ModelEntry]
    gpus: list[GpuEntry]
    models_source: str = Field(description="'huggingface' | 'cache' | 'built-in'")
    gpus_source: str = Field(description="'runpod' | 'cache' | 'built-in'")
    refreshed_at: float | None = Field(None, description="When the network last answered (epoch seconds)")
    notes: list[str] = Field([], exclude=True, description="What happened while loading (not cached)")

    def model(self, model_id: str) -> ModelEntry:
        """The model named ``model_id`` (id, Hugging Face repo, or an alias; any case), or a ``ConfigError``."""
        exact = [model for model in self.models if model.id == model_id]
        loose = [model for model in self.models if _norm(model_id) in map(_norm, model.names())]
        if exact or loose:
            return (exact or loose)[0]
        names = {_norm(name): model.id for model in self.models for name in model.names()}
        raise _unknown("modelStoreId", model_id, names, [model.id for model in self.models])

    def gpu(self, gpu_id: str) -> GpuEntry:
        """The GPU type ``gpu_id`` (RunPod id or display name, any case or spacing), or a ``ConfigError``."""
        exact = [gpu for gpu in self.gpus if gpu.id == gpu_id]
        loose = [gpu for gpu in self.gpus if _norm(gpu_id) in (_norm(gpu.id), _norm(gpu.name))]
        if exact or loose:
            return (exact or loose)[0]
        names = {_norm(name): gpu.id for gpu in self.gpus for name in (gpu.id, gpu.name)}
        raise _unknown("GPU type", gpu_id, names, [gpu.id for gpu in self.gpus])


def builtin_catalog() -> Catalog:
    return Catalog(
        models=list(BUILTIN_MODELS),
        gpus=list(BUILTIN_GPUS),
        models_source="built-in",
        gpus_source="built-in",
        refreshed_at=None,
    )


class CacheFile(BaseModel):
    """The catalog cache file as written by ``catalog_refresh.refresh_catalog``."""

    version: Literal[1]
    models: list[ModelEntry]
    gpus: list[GpuEntry]
    models_source: Literal["huggingface", "cache", "built-in"]
    gpus_source: Literal["runpod", "cache", "built-in"]
    refreshed_at: float | None


def _merge_models(found: Iterable[ModelEntry]) -> list[ModelEntry]:
    """The built-in models with what the Hub said about them (gated, weights_gb); our figures always win."""
    by_id = {model.id: model for model in found}
    return [
        model.model_copy(update={"gated": by_id[model.id].gated, "weights_gb": by_id[model.id].weights_gb})
        if model.id in by_id
        else model
        for model in BUILTIN_MODELS
    ]


def load_catalog(cache_path: Path) -> Catalog:
    """The cached catalog if ``cache_path`` holds a valid one, else the built-in lists (with a note saying why)."""
    try:
        text = cache_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return builtin_catalog()
    except (OSError, UnicodeDecodeError) as exc:
        return _fallback(f"catalog cache {cache_path} cannot be read ({exc}): using the built-in catalog")
    try:
        cached = CacheFile.model_validate_json(text)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        return _fallback(f"catalog cache {cache_path} is corrupt ({problem}): using the built-in catalog")
    live_models = cached.models_source != "built-in"
    live_gpus = cached.gpus_source != "built-in" and cached.gpus
    return Catalog(
        models=_merge_models(cached.models) if live_models else list(BUILTIN_MODELS),
        gpus=list(cached.gpus) if live_gpus else list(BUILTIN_GPUS),
        models_source="cache" if live_models else "built-in",
        gpus_source="cache" if live_gpus else "built-in",
        refreshed_at=cached.refreshed_at,
    )


def _fallback(note: str) -> Catalog:
    log.warning("%s", note)
    catalog = builtin_catalog()
    catalog.notes.append(note)
    return catalog


def check_fit(model: ModelEntry, gpu: GpuEntry, max_model_len: int | None = None) -> None:
    """Raise a one-line ``ConfigError`` unless ``model`` with ``max_model_len`` tokens (default: its
    context_length) fits on one ``gpu``."""
    if gpu.memory_gb < model.min_gpu_memory_gb:
        raise ConfigError(
            f"model {model.id} needs at least {model.min_gpu_memory_gb} GB of GPU memory; "
            f"GPU {gpu.id} has {gpu.memory_gb} GB"
        )
    if max_model_len is None or max_model_len <= model.context_length:
        return
    if max_model_len > model.max_context_length:
        raise ConfigError(
            f"max_model_len={max_model_len} is more than model {model.id} supports ({model.max_context_length} tokens)"
        )
    fits = model.max_tokens_on(gpu.memory_gb)
    if max_model_len > fits:
        kv_gb = model.kv_cache_kib_per_token * 1024 * max_model_len / 1e9
        need = (model.estimated_weights_gb + RUNTIME_OVERHEAD_GB + kv_gb) / GPU_MEMORY_UTILIZATION
        raise ConfigError(
            f"model {model.id} with max_model_len={max_model_len} needs about {need:.0f} GB of GPU "
            f"memory; GPU {gpu.id} has {gpu.memory_gb} GB (about {fits} tokens fit)"
        )


def validate_config(
    config: PodConfig, catalog: Catalog, notes: list[str] | None = None
) -> tuple[ModelEntry, list[GpuEntry]]:
    """Check ``config`` against ``catalog``: the model and every GPU candidate exist, the model fits the first
    candidate, and prices respect ``max_hourly_cost`` where known. Returns the model and the usable candidates
    in order: fallbacks the model does not fit and GPUs priced over ``max_hourly_cost`` are dropped, with a note
    appended to ``notes``. Raises a one-line ``ConfigError`` when nothing usable is left."""
    notes = [] if notes is None else notes
    model = catalog.model(config.modelStoreId)
    candidates = list({gpu.id: gpu for gpu in map(catalog.gpu, config.gpu_candidates)}.values())
    check_fit(model, candidates[0], config.max_model_len)
    usable = candidates[:1]
    for gpu in candidates[1:]:
        try:
            check_fit(model, gpu, config.max_model_len)
        except ConfigError as exc:
            notes.append(f"fallback GPU {gpu.id} dropped: {exc}")
        else:
            usable.append(gpu)
    if config.max_hourly_cost is None:
        return model, usable
    cloud, limit = config.cloud_type, config.max_hourly_cost
    affordable = [gpu for gpu in usable if (gpu.price(cloud) or 0) <= limit]
    for gpu in usable:
        if gpu not in affordable:
            notes.append(f"GPU {gpu.id} dropped: ${gpu.price(cloud):.2f}/h on {cloud} cloud is over max_hourly_cost")
    if not affordable:
        prices = ", ".join(f"{gpu.id} ${gpu.price(cloud):.2f}/h" for gpu in usable)
        raise ConfigError(f"max_hourly_cost={limit:g}: every GPU candidate costs more on {cloud} cloud ({prices})")
    return model, affordable
