"""The built-in Model Store: the coding models we checked (``BUILTIN_MODELS``) and common RunPod GPU types
(``BUILTIN_GPUS``, exact v2 ids), with where each model's tool-calling facts come from.

``catalog.load_catalog`` falls back to these lists, and always takes every model fact but the Hub's (gated,
weights size) from ``BUILTIN_MODELS``.
"""

from __future__ import annotations

from typing import Literal

from llmpod.pod.catalog_entries import GpuEntry, ModelEntry


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
