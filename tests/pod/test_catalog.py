"""The Model Store: built-in figures, lookups, fit and price checks, the cache, the refresh from RunPod and the Hub."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from llmpod.errors import ConfigError, RunPodAuthError
from llmpod.pod import PodConfig
from llmpod.pod import catalog as catalog_module
from llmpod.pod.catalog import (
    BUILTIN_GPUS,
    BUILTIN_MODELS,
    Catalog,
    GpuEntry,
    builtin_catalog,
    check_fit,
    load_catalog,
    validate_config,
)
from llmpod.pod.catalog_refresh import DEFAULT_HF_API_BASE, refresh_catalog

HUB = "http://hub.test"
DS33 = "deepseek-coder-33b-instruct-awq"
DEFAULT = "qwen2.5-coder-32b-instruct-awq"


def error(call: Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def priced_catalog(**prices: float) -> Catalog:
    """The built-in catalog with secure-cloud prices for some GPUs (keyed by display name, spaces as _)."""
    gpus = [gpu.model_copy(update={"price_secure": prices.get(gpu.name.replace(" ", "_"))}) for gpu in BUILTIN_GPUS]
    return Catalog(
        models=list(BUILTIN_MODELS), gpus=gpus, models_source="built-in", gpus_source="runpod", refreshed_at=1.0
    )


# -------------------------------------------------------------------------------------------- built-in figures
def test_builtin_models_are_sane() -> None:
    ids = [model.id for model in BUILTIN_MODELS]
    assert 8 <= len(ids) <= 10 and len(set(ids)) == len(ids)
    every_name = [name.casefold() for model in BUILTIN_MODELS for name in set(map(str.casefold, model.names()))]
    assert len(every_name) == len(set(every_name)), "a name must not lead to two models"
    for model in BUILTIN_MODELS:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", model.hf_repo), model.hf_repo
        assert model.id == model.id.lower() and " " not in model.id
        assert model.parameters_b > 0 and model.min_gpu_memory_gb > 0 and model.kv_cache_kib_per_token > 0
        assert 4096 <= model.context_length <= model.max_context_length
        assert model.weights_gb is None and not model.gated
        # our own estimate agrees with the declared minimum: context_length fits there, and not on half of it
        assert model.max_tokens_on(model.min_gpu_memory_gb) >= model.context_length, model.id
        assert model.max_tokens_on(model.min_gpu_memory_gb / 2) < model.context_length, model.id


def test_every_builtin_model_fits_a_builtin_gpu_and_the_default_is_in_the_store() -> None:
    for model in BUILTIN_MODELS:
        assert any(gpu.memory_gb >= model.min_gpu_memory_gb for gpu in BUILTIN_GPUS), model.id
        assert any(gpu.memory_gb == model.min_gpu_memory_gb for gpu in BUILTIN_GPUS), model.id
    model, gpus = validate_config(PodConfig(), builtin_catalog())
    assert model.id == DEFAULT and model.hf_repo == "Qwen/Qwen2.5-Coder-32B-Instruct-AWQ"
    assert model.tool_calling  # the default serves an agent's turns
    assert [gpu.id for gpu in gpus] == ["NVIDIA RTX A6000", "NVIDIA L40S", "NVIDIA A40"]  # 48 GB fallbacks


# vLLM 0.33.0's parser per family (vllm/tool_parsers/__init__.py and docs/features/tool_calling.md)
TOOL_PARSERS = {
    "deepseek-coder-33b-instruct-awq": None,
    "deepseek-coder-6.7b-instruct": None,
    "deepseek-coder-v2-lite-instruct": None,
    "qwen2.5-coder-7b-instruct": "hermes",
    "qwen2.5-coder-14b-instruct-awq": "hermes",
    "qwen2.5-coder-32b-instruct-awq": "hermes",
    "qwen3-coder-30b-a3b-instruct-fp8": "qwen3_coder",
    "qwen3-coder-30b-a3b-instruct": "qwen3_coder",
    "codellama-13b-instruct-awq": None,
}


def test_every_model_says_how_vllm_calls_tools_for_it_and_where_that_comes_from() -> None:
    assert {model.id: model.tool_call_parser for model in BUILTIN_MODELS} == TOOL_PARSERS
    for model in BUILTIN_MODELS:
        assert model.tool_calling == (model.tool_call_parser is not None)
        assert model.chat_template is None  # each renders tools with its own template, or has no tool calling
        assert "vLLM" in model.tool_calling_source and "tool_calling.md" in model.tool_calling_source, model.id
        if model.tool_calling:
            assert model.tool_call_parser in model.tool_calling_source


def test_a_cache_from_before_tool_calling_gets_the_builtin_facts(tmp_path: Path) -> None:
    """Cached entries carry no tool-calling fields (or stale ones): the built-in facts win, the cache stays valid."""
    path = tmp_path / "catalog.json"
    old = [m.model_dump(exclude={"tool_call_parser", "chat_template", "tool_calling_source"}) for m in BUILTIN_MODELS]
    old[0]["tool_call_parser"] = "pythonic"  # a stale fact
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "models": old,
                "gpus": [],
                "models_source": "huggingface",
                "gpus_source": "built-in",
                "refreshed_at": 1.0,
            }
        )
    )

    catalog = load_catalog(path)

    assert catalog.models_source == "cache" and catalog.notes == []
    assert {model.id: model.tool_call_parser for model in catalog.models} == TOOL_PARSERS


def test_builtin_gpus_are_sane() -> None:
    ids = [gpu.id for gpu in BUILTIN_GPUS]
    assert len(set(ids)) == len(ids) and len({gpu.name for gpu in BUILTIN_GPUS}) == len(ids)
    assert {
        "NVIDIA GeForce RTX 4090",
        "NVIDIA RTX A6000",
        "NVIDIA L40S",
        "NVIDIA A100 80GB PCIe",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA RTX A5000",
        "NVIDIA L4",
    } <= set(ids)
    assert all(gpu.memory_gb >= 24 and gpu.price_secure is None and gpu.availability is None for gpu in BUILTIN_GPUS)


# ---------------------------------------------------------------------------------------------------- lookups
@pytest.mark.parametrize(
    "name",
    [
        DS33,
        "DeepSeek-Coder-33B-Instruct-AWQ",
        "TheBloke/deepseek-coder-33B-instruct-AWQ",
        "thebloke/deepseek-coder-33b-instruct-awq",
        "deepseek-coder-33b-awq",
        "deepseek-ai/deepseek-coder-33b-awq",
    ],
)
def test_model_lookup_by_id_repo_or_alias_in_any_case(name: str) -> None:
    assert builtin_catalog().model(name).id == DS33


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "deepseek-coder-34b",
            "unknown modelStoreId 'deepseek-coder-34b': did you mean 'deepseek-coder-33b-instruct-awq'",
        ),
        ("qwen3 coder", "did you mean 'qwen3-coder-30b-a3b-instruct-fp8' or 'qwen3-coder-30b-a3b-instruct'?"),
        ("qwen2.5-coder-7b", "did you mean 'qwen2.5-coder-7b-instruct'?"),
        ("mistral-7b", "unknown modelStoreId 'mistral-7b'; known: deepseek-coder-33b-instruct-awq, "),
    ],
)
def test_unknown_models_suggest_close_ids(name: str, expected: str) -> None:
    assert expected in error(lambda: builtin_catalog().model(name))


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "RTX 4090", "rtx 4090", "nvidia geforce  rtx 4090"])
def test_gpu_lookup_by_id_or_name_in_any_case_and_spacing(name: str) -> None:
    assert builtin_catalog().gpu(name).id == "NVIDIA GeForce RTX 4090"


def test_gpu_lookup_prefers_the_exact_id() -> None:
    gpus = [
        GpuEntry(id="NVIDIA  RTX A4500", name="RTX A4500", memory_gb=20),
        GpuEntry(id="NVIDIA RTX A4500", name="RTX A4500", memory_gb=20),
    ]
    catalog = Catalog(models=[], gpus=gpus, models_source="built-in", gpus_source="runpod", refreshed_at=None)
    assert catalog.gpu("NVIDIA RTX A4500") is gpus[1]
    assert catalog.gpu("NVIDIA  RTX A4500") is gpus[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("4090", "unknown GPU type '4090': did you mean 'NVIDIA GeForce RTX 4090'?"),
        ("A100", "did you mean 'NVIDIA A100 80GB PCIe' or 'NVIDIA A100-SXM4-80GB'?"),
        ("NVIDIA RTX A600", "did you mean 'NVIDIA RTX A6000'"),
        ("V100", "unknown GPU type 'V100'; known: NVIDIA GeForce RTX 4090, "),
    ],
)
def test_unknown_gpus_suggest_close_ids(name: str, expected: str) -> None:
    assert expected in error(lambda: builtin_catalog().gpu(name))


# ---------------------------------------------------------------------------------------------------- fitting
def test_check_fit_refuses_a_33b_model_on_a_24_gb_gpu() -> None:
    catalog = builtin_catalog()
    message = error(lambda: check_fit(catalog.model(DS33), catalog.gpu("RTX 4090"), None))
    assert message == (f"model {DS33} needs at least 48 GB of GPU memory; GPU NVIDIA GeForce RTX 4090 has 24 GB")
    check_fit(catalog.model(DS33), catalog.gpu("RTX A6000"), None)
    check_fit(catalog.model(DS33), catalog.gpu("RTX A6000"), 16384)


def test_check_fit_with_a_longer_context() -> None:
    catalog = builtin_catalog()
    qwen14 = catalog.model("qwen2.5-coder-14b-instruct-awq")
    check_fit(qwen14, catalog.gpu("L40S"), 32768)
    over = error(lambda: check_fit(qwen14, catalog.gpu("L40S"), 65536))
    assert over == f"max_model_len=65536 is more than model {qwen14.id} supports (32768 tokens)"

    coder6 = catalog.model("deepseek-coder-6.7b-instruct")
    too_long = error(lambda: check_fit(coder6, catalog.gpu("RTX 4090"), 16384))
    assert re.fullmatch(
        rf"model {coder6.id} with max_model_len=16384 needs about \d+ GB of GPU memory; GPU "
        r"NVIDIA GeForce RTX 4090 has 24 GB \(about \d+ tokens fit\)",
        too_long,
    )
    check_fit(coder6, catalog.gpu("RTX A6000"), 16384)


def test_check_fit_uses_the_hubs_weight_size_when_known() -> None:
    catalog = builtin_catalog()
    heavy = catalog.model("qwen3-coder-30b-a3b-instruct-fp8").model_copy(update={"weights_gb": 40.0})
    assert heavy.max_tokens_on(48) < catalog.model("qwen3-coder-30b-a3b-instruct-fp8").max_tokens_on(48)
    assert "about" in error(lambda: check_fit(heavy, catalog.gpu("L40S"), 131072))


# ------------------------------------------------------------------------------------------ validate_config
def test_validate_config_refuses_an_unknown_model_or_gpu() -> None:
    catalog = builtin_catalog()
    assert "unknown modelStoreId 'deepseek-coder-34b'" in error(
        lambda: validate_config(PodConfig(modelStoreId="deepseek-coder-34b"), catalog)
    )
    assert "unknown GPU type 'RTX 4091': did you mean 'NVIDIA GeForce RTX 4090'" in error(
        lambda: validate_config(PodConfig(gpu_type_ids=["NVIDIA L40S", "RTX 4091"]), catalog)
    )


def test_validate_config_refuses_a_first_gpu_that_is_too_small() -> None:
    config = PodConfig(gpu_type_id="NVIDIA GeForce RTX 4090", gpu_type_ids=["NVIDIA RTX A6000"])
    assert "needs at least 48 GB" in error(lambda: validate_config(config, builtin_catalog()))


def test_validate_config_drops_fallbacks_that_do_not_fit_and_duplicates() -> None:
    config = PodConfig(gpu_type_ids=["L40S", "NVIDIA GeForce RTX 4090", "RTX A6000", "NVIDIA A100 80GB PCIe"])
    notes: list[str] = []

    model, gpus = validate_config(config, builtin_catalog(), notes)

    assert model.id == DEFAULT
    assert [gpu.id for gpu in gpus] == ["NVIDIA RTX A6000", "NVIDIA L40S", "NVIDIA A100 80GB PCIe"]
    assert notes == [
        f"fallback GPU NVIDIA GeForce RTX 4090 dropped: model {DEFAULT} needs at least 48 GB of GPU "
        "memory; GPU NVIDIA GeForce RTX 4090 has 24 GB"
    ]


def test_validate_config_applies_max_hourly_cost_where_prices_are_known() -> None:
    catalog = priced_catalog(RTX_A6000=0.49, L40S=0.86)  # the A40 has no price: kept
    config = PodConfig(gpu_type_ids=["NVIDIA L40S", "NVIDIA A40"], max_hourly_cost=0.6)
    notes: list[str] = []

    _, gpus = validate_config(config, catalog, notes)

    assert [gpu.id for gpu in gpus] == ["NVIDIA RTX A6000", "NVIDIA A40"]
    assert notes == ["GPU NVIDIA L40S dropped: $0.86/h on SECURE cloud is over max_hourly_cost"]
    assert [gpu.id for gpu in validate_config(config.model_copy(update={"cloud_type": "COMMUNITY"}), catalog)[1]] == [
        "NVIDIA RTX A6000",
        "NVIDIA L40S",
        "NVIDIA A40",
    ]  # no community prices known


def test_validate_config_refuses_when_every_gpu_costs_too_much() -> None:
    config = PodConfig(gpu_type_ids=["NVIDIA L40S"], max_hourly_cost=0.25)
    message = error(lambda: validate_config(config, priced_catalog(RTX_A6000=0.49, L40S=0.86)))
    assert message == (
        "max_hourly_cost=0.25: every GPU candidate costs more on SECURE cloud "
        "(NVIDIA RTX A6000 $0.49/h, NVIDIA L40S $0.86/h)"
    )


def test_validate_config_refuses_a_context_longer_than_the_model() -> None:
    config = PodConfig(
        modelStoreId="qwen2.5-coder-7b-instruct", gpu_type_id="NVIDIA H100 80GB HBM3", max_model_len=131072
    )
    assert "is more than model qwen2.5-coder-7b-instruct supports" in error(
        lambda: validate_config(config, builtin_catalog())
    )


# ------------------------------------------------------------------------------------------------ the cache
def test_load_catalog_without_a_cache_is_the_builtin_one(tmp_path: Path) -> None:
    catalog = load_catalog(tmp_path / "catalog.json")
    assert (catalog.models_source, catalog.gpus_source, catalog.refreshed_at, catalog.notes) == (
        "built-in",
        "built-in",
        None,
        [],
    )
    assert catalog.models == list(BUILTIN_MODELS) and catalog.gpus == list(BUILTIN_GPUS)


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"\xff\xfe", b"[]", b'{"version": 2}', b"null", b'{"version": 1, "models": [{"id": 1}], "gpus": []}'],
)
def test_a_corrupt_cache_falls_back_to_the_builtin_catalog_with_a_note(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "catalog.json"
    path.write_bytes(content)

    catalog = load_catalog(path)

    assert (catalog.models_source, catalog.gpus_source) == ("built-in", "built-in")
    assert len(catalog.notes) == 1 and str(path) in catalog.notes[0] and "built-in catalog" in catalog.notes[0]


# ---------------------------------------------------------------------------------------------- the refresh
def runpod_gpus() -> list[Any]:
    """What the RunPod client's ``gpu_types`` gives: objects with attributes (a dict is accepted too)."""
    return [
        SimpleNamespace(
            id="NVIDIA RTX A6000",
            name="RTX A6000",
            memory_gb=48,
            price_secure=0.49,
            price_community=0.33,
            availability="HIGH",
        ),
        SimpleNamespace(
            id="NVIDIA GeForce RTX 4090",
            name="RTX 4090",
            memory_gb=24,
            price_secure=0.69,
            price_community=0.34,
            availability=SimpleNamespace(value="LOW"),
        ),
        {"id": "NVIDIA B200", "name": "B200", "memory_gb": 180, "price_secure": 5.99, "price_community": 0.0},
        SimpleNamespace(id="broken", name="x", memory_gb=None, price_secure=None, price_community=None),
    ]


def hub_answers(request: httpx.Request) -> httpx.Response:
    repo = request.url.path.removeprefix("/api/models/")
    if repo == "TheBloke/deepseek-coder-33B-instruct-AWQ":
        return httpx.Response(
            200,
            json={
                "id": repo,
                "gated": "manual",
                "usedStorage": 90_000_000_000,
                "safetensors": {"parameters": {"I32": 3_900_000_000, "F16": 1_200_000_000}, "total": 5_100_000_000},
            },
        )
    if repo == "Qwen/Qwen2.5-Coder-7B-Instruct":
        return httpx.Response(404, json={"error": "Repository not found"})
    if repo == "TheBloke/CodeLlama-13B-Instruct-AWQ":
        return httpx.Response(503, text="busy")
    return httpx.Response(200, json={"id": repo, "gated": False, "usedStorage": 16_000_000_000})


def test_refresh_from_runpod_and_the_hub_writes_a_cache_that_loads_as_cache(tmp_path: Path) -> None:
    path = tmp_path / "state" / "catalog.json"
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return hub_answers(request)

    with httpx.Client(transport=httpx.MockTransport(handler)) as hub:
        catalog, notes = refresh_catalog(path, gpu_source=runpod_gpus, hub=hub, hf_api_base=HUB + "/")

    assert seen[0] == f"{HUB}/api/models/TheBloke/deepseek-coder-33B-instruct-AWQ" and len(seen) == len(BUILTIN_MODELS)
    assert (catalog.models_source, catalog.gpus_source) == ("huggingface", "runpod")
    assert catalog.refreshed_at is not None
    ds33 = catalog.model(DS33)
    assert ds33.gated is True and ds33.weights_gb == 18.0  # 3.9e9 x 4 bytes + 1.2e9 x 2 bytes, not usedStorage
    assert catalog.model("qwen2.5-coder-7b-instruct").weights_gb is None
    assert catalog.model("qwen2.5-coder-14b-instruct-awq").weights_gb == 16.0
    assert [gpu.id for gpu in catalog.gpus] == ["NVIDIA RTX A6000", "NVIDIA GeForce RTX 4090", "NVIDIA B200"]
    assert catalog.gpu("RTX 4090").availability == "LOW" and catalog.gpu("B200").price("COMMUNITY") is None
    assert "GPU types: 3 from RunPod, with current prices" in notes
    assert any(note.startswith("skipped a GPU type RunPod listed") for note in notes)
    assert (
        f"model {DS33} is gated on Hugging Face: accept its terms there and put a token in the variable named "
        "by hf_token_env" in notes
    )
    assert "model qwen2.5-coder-7b-instruct not found on the Hub (Qwen/Qwen2.5-Coder-7B-Instruct, HTTP 404)" in notes
    assert any("HTTP 503 for TheBloke/CodeLlama-13B-Instruct-AWQ" in note for note in notes)
    count = len(BUILTIN_MODELS)
    assert f"models: Hub figures for {count - 2} of {count} models from Hugging Face" in notes
    assert all("\n" not in note for note in notes)

    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["catalog.json"]  # no temporary file left
    reloaded = load_catalog(path)
    assert (reloaded.models_source, reloaded.gpus_source, reloaded.notes) == ("cache", "cache", [])
    assert reloaded.models == catalog.models and reloaded.gpus == catalog.gpus
    assert reloaded.refreshed_at == catalog.refreshed_at


def test_the_cache_keeps_only_hub_figures_for_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer release's figures (and models) win over an old cache; only gated and weights_gb come from it."""
    path = tmp_path / "catalog.json"
    with httpx.Client(transport=httpx.MockTransport(hub_answers)) as hub:
        refresh_catalog(path, gpu_source=None, hub=hub, hf_api_base=HUB)
    newer = tuple(m.model_copy(update={"context_length": 4096}) for m in BUILTIN_MODELS[:-1])
    monkeypatch.setattr(catalog_module, "BUILTIN_MODELS", newer)

    catalog = load_catalog(path)

    assert catalog.models_source == "cache" and catalog.gpus_source == "built-in"
    _, notes = refresh_catalog(path, gpu_source=None, hub=None)
    assert notes[0] == "RunPod was not asked: using the built-in GPU list"  # no date: never came from RunPod
    assert notes[1].startswith("Hugging Face was not asked: using the cached model figures from 20")
    assert [m.id for m in catalog.models] == [m.id for m in newer]
    assert all(m.context_length == 4096 for m in catalog.models)
    assert catalog.model(DS33).gated is True


def test_a_silent_network_keeps_the_cache_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    with httpx.Client(transport=httpx.MockTransport(hub_answers)) as hub:
        first, _ = refresh_catalog(path, gpu_source=runpod_gpus, hub=hub, hf_api_base=HUB)
    calls = 0

    def unreachable(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("Name or service not known", request=request)

    def no_key() -> list[Any]:
        raise RunPodAuthError("RUNPOD_API_KEY was refused (401)", 401)

    with httpx.Client(transport=httpx.MockTransport(unreachable)) as hub:
        catalog, notes = refresh_catalog(path, gpu_source=no_key, hub=hub, hf_api_base=HUB)

    assert calls == 1  # gave up after the first failure instead of waiting on every model
    assert (catalog.models_source, catalog.gpus_source) == ("cache", "cache")
    assert catalog.models == first.models and catalog.gpus == first.gpus
    assert catalog.refreshed_at == first.refreshed_at
    assert notes[0].startswith(
        "warning: RunPod did not list its GPU types (RunPodAuthError: RUNPOD_API_KEY was "
        "refused (401)): using the cached GPU list from "
    )
    assert notes[1].startswith(
        "Hugging Face did not answer (ConnectError: Name or service not known): using the cached model figures from "
    )
    assert load_catalog(path).models == first.models


def test_nothing_reachable_and_no_cache_gives_the_builtin_catalog(tmp_path: Path) -> None:
    catalog, notes = refresh_catalog(tmp_path / "catalog.json", gpu_source=None, hub=None)

    assert (catalog.models_source, catalog.gpus_source, catalog.refreshed_at) == ("built-in", "built-in", None)
    assert notes == [
        "RunPod was not asked: using the built-in GPU list",
        "Hugging Face was not asked: using the built-in model figures",
    ]
    assert load_catalog(tmp_path / "catalog.json").models_source == "built-in"
    assert DEFAULT_HF_API_BASE == "https://huggingface.co"


def test_the_cache_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.json"
    with httpx.Client(transport=httpx.MockTransport(hub_answers)) as hub:
        refresh_catalog(path, gpu_source=runpod_gpus, hub=hub, hf_api_base=HUB)
    before = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    catalog, notes = refresh_catalog(path, gpu_source=lambda: runpod_gpus()[:1], hub=None)

    assert [gpu.id for gpu in catalog.gpus] == ["NVIDIA RTX A6000"]  # the refresh is still returned
    assert notes[-1] == (f"could not write the catalog cache {path} (No space left on device): the refresh is not kept")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.json"]
