"""Will the model run where the pod is about to be put (llmpod.pod.fit)? Disk, GPU memory, and the quantization
against the GPU's compute capability as vLLM 0.33.0 has it (sources in llmpod/pod/fit.py's docstring)."""

from __future__ import annotations

import pytest

from llmpod.errors import ConfigError
from llmpod.pod import PodConfig
from llmpod.pod.catalog import BUILTIN_GPUS, BUILTIN_MODELS, GpuEntry, ModelEntry, builtin_catalog
from llmpod.pod.fit import check_disk, compute_capability, gpu_note, gpu_problem, usable_gpus
from tests.fakes.fake_runpod_pods import GPU_TYPES as FAKE_GPUS

CATALOG = builtin_catalog()
QWEN3_BF16 = CATALOG.model("qwen3-coder-30b-a3b-instruct")
QWEN3_FP8 = CATALOG.model("qwen3-coder-30b-a3b-instruct-fp8")
DS33_AWQ = CATALOG.model("deepseek-coder-33b-instruct-awq")
V100 = GpuEntry(id="Tesla V100-SXM2-32GB", name="Tesla V100", memory_gb=32)


def gptq(model: ModelEntry) -> ModelEntry:
    return model.model_copy(update={"quantization": "gptq"})


# ----------------------------------------------------------------------------------------------------- disk
def test_the_bf16_qwen3_coder_does_not_fit_the_default_disk() -> None:
    """Issue 14: about 61 GB of weights against container_disk_gb's default of 60."""
    with pytest.raises(ConfigError) as caught:
        check_disk(QWEN3_BF16, PodConfig(modelStoreId=QWEN3_BF16.id))
    assert str(caught.value) == (
        "model qwen3-coder-30b-a3b-instruct needs about 66 GB of container disk (61 GB of weights + 5 GB headroom), "
        "but container_disk_gb is 60: set container_disk_gb to at least 66 in pod_config.json"
    )
    assert caught.value.exit_code == 2
    check_disk(QWEN3_BF16, PodConfig(modelStoreId=QWEN3_BF16.id, container_disk_gb=66))


def test_every_other_builtin_model_fits_the_default_disk() -> None:
    for model in BUILTIN_MODELS:
        if model.id != QWEN3_BF16.id:
            check_disk(model, PodConfig(modelStoreId=model.id))


def test_the_hubs_weight_size_is_used_when_known() -> None:
    heavy = DS33_AWQ.model_copy(update={"weights_gb": 58.2})
    with pytest.raises(ConfigError, match="needs about 64 GB of container disk"):
        check_disk(heavy, PodConfig())


# ----------------------------------------------------------------------------------------------- GPU memory
def test_weights_and_kv_cache_must_fit_the_gpus_memory() -> None:
    a6000, a100 = CATALOG.gpu("RTX A6000"), CATALOG.gpu("A100 PCIe")
    problem = gpu_problem(QWEN3_BF16, a6000, 65536)
    assert problem == (
        "model qwen3-coder-30b-a3b-instruct needs about 77 GB of GPU memory (61 GB of weights + "
        "6.4 GB of KV cache for max_model_len=65536); NVIDIA RTX A6000 has 48 GB"
    )
    assert gpu_problem(QWEN3_BF16, a100, 65536) is None
    assert gpu_problem(QWEN3_BF16, a6000, 65536, count=2) is None  # 2 x 48 GB
    assert "needs about" in (gpu_problem(QWEN3_BF16, a100, 262144) or "")  # the KV cache counts too


def test_every_builtin_model_fits_its_own_minimum_gpu() -> None:
    """The computed check agrees with the catalog's figures: nothing the catalog offers is refused."""
    for model in BUILTIN_MODELS:
        smallest = min(
            (gpu for gpu in BUILTIN_GPUS if gpu.memory_gb >= model.min_gpu_memory_gb), key=lambda gpu: gpu.memory_gb
        )
        assert gpu_problem(model, smallest, model.context_length) is None, model.id


# ------------------------------------------------------------------------------------ compute capability
def test_every_gpu_of_the_catalog_and_the_fake_has_a_compute_capability() -> None:
    for gpu in [*BUILTIN_GPUS, *(GpuEntry(id=g.id, name=g.name, memory_gb=g.memory) for g in FAKE_GPUS)]:
        assert compute_capability(gpu) is not None, gpu.id
    assert compute_capability(CATALOG.gpu("RTX A6000")) == 86 and compute_capability(CATALOG.gpu("L40S")) == 89
    assert compute_capability(CATALOG.gpu("A100 PCIe")) == 80 and compute_capability(CATALOG.gpu("H100 SXM")) == 90


def test_gpus_a_refreshed_catalog_adds_are_known_by_family() -> None:
    assert compute_capability(GpuEntry(id="NVIDIA A10G", name="A10G", memory_gb=24)) == 86
    assert compute_capability(GpuEntry(id="NVIDIA H100 SXM5 94GB", name="H100 SXM5", memory_gb=94)) == 90
    assert compute_capability(GpuEntry(id="NVIDIA RTX PRO 4500 Blackwell", name="RTX PRO 4500", memory_gb=32)) == 120
    unknown = GpuEntry(id="AMD Instinct MI300X OAM", name="MI300X", memory_gb=192)
    assert compute_capability(unknown) is None
    assert gpu_problem(DS33_AWQ, unknown, 16384) is None and gpu_note(QWEN3_FP8, unknown) is None  # not guessed


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        (
            DS33_AWQ,
            "vLLM 0.33 runs AWQ weights from compute capability 7.5; Tesla V100-SXM2-32GB has compute "
            "capability 7.0, Volta",
        ),
        (
            QWEN3_FP8,
            "vLLM 0.33 runs FP8 weights from compute capability 7.5; Tesla V100-SXM2-32GB has compute "
            "capability 7.0, Volta",
        ),
        (gptq(DS33_AWQ), None),  # GPTQ from 6.0
    ],
    ids=["awq", "fp8", "gptq"],
)
def test_quantization_needs_the_compute_capability_vllm_asks_for(model: ModelEntry, refused: str | None) -> None:
    assert gpu_problem(model, V100, 4096) == refused


def test_fp8_on_ampere_runs_through_marlin_with_a_note() -> None:
    a6000 = CATALOG.gpu("RTX A6000")
    assert gpu_problem(QWEN3_FP8, a6000, QWEN3_FP8.context_length) is None  # allowed: vLLM falls back, not fails
    assert gpu_note(QWEN3_FP8, a6000) == (
        "note: NVIDIA RTX A6000 (compute capability 8.6, Ampere) has no FP8 hardware: vLLM 0.33 runs "
        "qwen3-coder-30b-a3b-instruct-fp8 weight-only through its FP8 Marlin kernel (weights stay FP8, the maths is "
        "16-bit; slower on long prompts)"
    )
    assert gpu_note(QWEN3_FP8, CATALOG.gpu("A100 PCIe")) is not None
    assert gpu_note(QWEN3_FP8, CATALOG.gpu("L40S")) is None and gpu_note(QWEN3_FP8, CATALOG.gpu("H100 SXM")) is None
    assert gpu_note(DS33_AWQ, a6000) is None and gpu_note(QWEN3_BF16, a6000) is None


# ------------------------------------------------------------------------------------------ the candidates
def test_candidates_that_do_not_fit_are_skipped_with_their_reason() -> None:
    said: list[str] = []
    gpus = [V100, CATALOG.gpu("RTX A6000")]
    assert usable_gpus(PodConfig(modelStoreId=DS33_AWQ.id), DS33_AWQ, gpus, said.append) == [gpus[1]]
    assert said == [
        "GPU Tesla V100-SXM2-32GB skipped: vLLM 0.33 runs AWQ weights from compute capability 7.5; "
        "Tesla V100-SXM2-32GB has compute capability 7.0, Volta"
    ]


def test_no_candidate_left_is_one_config_error() -> None:
    config = PodConfig(modelStoreId=QWEN3_BF16.id, container_disk_gb=80)
    with pytest.raises(ConfigError) as caught:
        usable_gpus(config, QWEN3_BF16, [CATALOG.gpu("RTX A6000"), CATALOG.gpu("L40S")])
    message = str(caught.value)
    assert message.startswith("no GPU candidate can serve model qwen3-coder-30b-a3b-instruct: NVIDIA RTX A6000: ")
    assert "; NVIDIA L40S: model qwen3-coder-30b-a3b-instruct needs about 77 GB" in message and "\n" not in message
    assert caught.value.exit_code == 2


def test_the_disk_is_checked_before_the_gpus() -> None:
    with pytest.raises(ConfigError, match="container_disk_gb"):
        usable_gpus(PodConfig(modelStoreId=QWEN3_BF16.id), QWEN3_BF16, [CATALOG.gpu("A100 PCIe")])
