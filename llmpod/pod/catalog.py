"""Our "Model Store": the coding models manage_pod.py knows how to serve, and the GPUs to serve them on.

RunPod has no model store for pods (vLLM downloads the weights from Hugging Face when the pod starts), so the
store is ours: ``catalog_data`` holds the built-in lists (``BUILTIN_MODELS``, ``BUILTIN_GPUS``) and
``catalog_entries`` the entry models and sizing figures. ``catalog_refresh`` asks RunPod for its GPU list
(prices, stock) and the Hugging Face Hub for each model's gated flag and weight size, and caches the result.

This module owns the catalog itself: ``Catalog`` (name lookups), the cache file, ``load_catalog`` (the cache, or
the built-in lists), ``check_fit`` and ``validate_config`` (a ``PodConfig`` against the catalog). It re-exports
the names of the two other modules that callers have always imported from here.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from llmpod.errors import ConfigError
from llmpod.pod.catalog_data import BUILTIN_GPUS, BUILTIN_MODELS
from llmpod.pod.catalog_entries import GPU_MEMORY_UTILIZATION, RUNTIME_OVERHEAD_GB, GpuEntry, ModelEntry
from llmpod.pod.config import PodConfig

__all__ = [
    "BUILTIN_GPUS",
    "BUILTIN_MODELS",
    "CACHE_VERSION",
    "GPU_MEMORY_UTILIZATION",
    "RUNTIME_OVERHEAD_GB",
    "CacheFile",
    "Catalog",
    "GpuEntry",
    "ModelEntry",
    "builtin_catalog",
    "check_fit",
    "load_catalog",
    "validate_config",
]

log = logging.getLogger(__name__)

# The cache holds only what refreshes (Hub figures, GPU prices): every other model fact, tool calling included,
# comes from BUILTIN_MODELS when it is read (_merge_models), so entries cached before a fact existed stay valid.
CACHE_VERSION = 1


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
