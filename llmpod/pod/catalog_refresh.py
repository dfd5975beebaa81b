"""Refreshing the catalog: RunPod's GPU list (prices, stock) and the Hugging Face Hub's figures for each model
(gated flag, weight size), merged into what we have and cached beside the config. Never fails for a network
problem: what cannot be refreshed is kept, and a one-line note says which source was used for what.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from llmpod._files import atomic_write
from llmpod.pod.catalog import CACHE_VERSION, CacheFile, Catalog, GpuEntry, ModelEntry, load_catalog

__all__ = ["DEFAULT_HF_API_BASE", "refresh_catalog"]

DEFAULT_HF_API_BASE = "https://huggingface.co"
HUB_TIMEOUT = 10.0
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def _oneline(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _kept(what: str, source: str, catalog: Catalog) -> str:
    if source != "cache" or catalog.refreshed_at is None:
        return f"using the built-in {what}"
    return f"using the cached {what} from {time.strftime('%Y-%m-%d %H:%M', time.localtime(catalog.refreshed_at))}"


def refresh_catalog(
    cache_path: Path,
    *,
    gpu_source: Callable[[], list[Any]] | None,
    hub: httpx.Client | None,
    hf_api_base: str = DEFAULT_HF_API_BASE,
) -> tuple[Catalog, list[str]]:
    """Refresh the GPU list from ``gpu_source`` (RunPod) and the models' Hub figures through ``hub``, keep what
    cannot be refreshed, write the result to ``cache_path`` (atomically) and return it with one-line notes
    saying which source was used for what. Never raises for a network problem."""
    current = load_catalog(cache_path)
    notes = list(current.notes)
    gpus, gpus_source = _refresh_gpus(gpu_source, current, notes)
    models, models_source = _refresh_models(hub, hf_api_base, current, notes)
    answered = gpus_source == "runpod" or models_source == "huggingface"
    catalog = Catalog(
        models=models,
        gpus=gpus,
        models_source=models_source,
        gpus_source=gpus_source,
        refreshed_at=time.time() if answered else current.refreshed_at,
    )
    try:
        text = CacheFile(version=CACHE_VERSION, **catalog.model_dump()).model_dump_json(indent=1)
        atomic_write(cache_path, text.encode("utf-8"), make_dirs=True)
    except OSError as exc:
        notes.append(f"could not write the catalog cache {cache_path} ({exc.strerror or exc}): the refresh is not kept")
    catalog.notes.extend(notes)
    return catalog, notes


def _refresh_gpus(
    gpu_source: Callable[[], list[Any]] | None, current: Catalog, notes: list[str]
) -> tuple[list[GpuEntry], str]:
    keep = _kept("GPU list", current.gpus_source, current)
    if gpu_source is None:
        notes.append(f"RunPod was not asked: {keep}")
        return current.gpus, current.gpus_source
    try:
        items = list(gpu_source())
    except Exception as exc:  # the RunPod client's errors, or anything else it raises: keep what we have
        notes.append(f"warning: RunPod did not list its GPU types ({_oneline(exc)}): {keep}")
        return current.gpus, current.gpus_source
    gpus: list[GpuEntry] = []
    for item in items:
        try:
            gpus.append(_gpu_entry(item))
        except (ValidationError, TypeError, ValueError):
            notes.append(f"skipped a GPU type RunPod listed that could not be read: {' '.join(str(item).split())[:80]}")
    if not gpus:
        notes.append(f"RunPod listed no usable GPU types: {keep}")
        return current.gpus, current.gpus_source
    notes.append(f"GPU types: {len(gpus)} from RunPod, with current prices")
    return gpus, "runpod"


def _gpu_entry(item: Any) -> GpuEntry:
    def get(name: str) -> Any:
        value = item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)
        return getattr(value, "value", value)  # enums

    gpu_id = get("id")
    return GpuEntry(
        id=gpu_id,
        name=get("name") or gpu_id,
        memory_gb=get("memory_gb"),
        price_secure=get("price_secure"),
        price_community=get("price_community"),
        availability=get("availability"),
    )


def _refresh_models(
    hub: httpx.Client | None, hf_api_base: str, current: Catalog, notes: list[str]
) -> tuple[list[ModelEntry], str]:
    keep = _kept("model figures", current.models_source, current)
    if hub is None:
        notes.append(f"Hugging Face was not asked: {keep}")
        return current.models, current.models_source
    models: list[ModelEntry] = []
    answered = 0
    for index, model in enumerate(current.models):
        url = f"{hf_api_base.rstrip('/')}/api/models/{model.hf_repo}"
        try:
            response = hub.get(url, timeout=HUB_TIMEOUT)
        except httpx.HTTPError as exc:
            notes.append(f"Hugging Face did not answer ({_oneline(exc)}): {keep}")
            return [*models, *current.models[index:]], "huggingface" if answered else current.models_source
        if response.status_code in (401, 404):  # the Hub answers 401 for a repo that does not exist
            notes.append(f"model {model.id} not found on the Hub ({model.hf_repo}, HTTP {response.status_code})")
        elif response.status_code != 200:
            notes.append(f"Hugging Face answered HTTP {response.status_code} for {model.hf_repo}: keeping its figures")
        else:
            try:
                model = _with_hub_figures(model, response.json())
                answered += 1
            except (ValueError, TypeError, AttributeError) as exc:
                notes.append(
                    f"Hugging Face sent an unreadable answer for {model.hf_repo} ({_oneline(exc)}): keeping its figures"
                )
            if model.gated:
                notes.append(
                    f"model {model.id} is gated on Hugging Face: accept its terms there and put a token in "
                    "the variable named by hf_token_env"
                )
        models.append(model)
    notes.append(f"models: Hub figures for {answered} of {len(models)} models from Hugging Face")
    return models, "huggingface" if answered else current.models_source


def _with_hub_figures(model: ModelEntry, data: Any) -> ModelEntry:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    gated = data.get("gated", False) not in (False, None, "false")
    weights_bytes: float | None = None
    parameters = (data.get("safetensors") or {}).get("parameters")
    if isinstance(parameters, dict) and parameters:
        weights_bytes = sum(
            float(count) * SAFETENSORS_DTYPE_BYTES.get(str(dtype), 2) for dtype, count in parameters.items()
        )
    elif isinstance(data.get("usedStorage"), (int, float)) and data["usedStorage"] > 0:
        weights_bytes = float(data["usedStorage"])
    weights_gb = round(weights_bytes / 1e9, 1) if weights_bytes else model.weights_gb
    return model.model_copy(update={"gated": gated, "weights_gb": weights_gb})
