"""The pod configuration file, ``pod_config.json``: what to serve, on which GPU, for how long, at what price.

The keys are the original test plan's (``modelStoreId``, ``gpu_type_id``, ``runtime_seconds``, ``template_id``,
``proxy_port``, ``cache_dir``, ``max_cache_size``, ``max_cache_bytes``, ``enable_profiling``) plus what a real pod
needs. ``load_pod_config`` reads and checks the file and turns the first problem into a one-line ``ConfigError``
that names the file, the key and the bad value, e.g. ``pod_config.json: runtime_seconds='soon' is not an
integer``. Values are taken as JSON gives them: ``"3600"`` (a string) is not an integer.

A missing file is an error, unless the caller passes ``missing_ok=True`` (for a path the user did not choose):
then every setting has its default, which is also what the ``pod_config.json`` shipped with the project holds.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import string
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from llmpod.errors import ConfigError
from llmpod.key_rule_spec import KeyRule, check_rule_set
from llmpod.pod.config_messages import describe, json_type, parse_json, short, suggest_key
from llmpod.tool_calling import AUTO_TOOL_CHOICE, CHAT_TEMPLATE, TOOL_CALL_PARSER

REPO_ROOT = Path(__file__).resolve().parents[2]  # llmpod/pod/config.py -> the checkout
MOCK_SERVER = ["-m", "llmpod.mock"]  # run by this Python: the mock vLLM server
ARG_PLACEHOLDERS = ("port", "model", "served_model_name", "max_model_len")
# vllm serve flags that manage_pod.py sets itself; the key to use instead, if any
RESERVED_VLLM_FLAGS = {
    "--model": "modelStoreId",
    "--host": None,
    "--port": None,
    "--api-key": None,
    "--served-model-name": None,
    "--max-model-len": "max_model_len",
}
# Tool calling: manage_pod.py adds --enable-auto-tool-choice --tool-call-parser P for models that have a parser
# (llmpod.tool_calling). A user's --tool-call-parser or --chat-template replaces ours (vLLM has several parsers
# for some families, and plugins), so each must carry a value and come once; turning tool calling off is refused
# because the proxy is told the pod calls tools.
VALUED_TOOL_FLAGS = (TOOL_CALL_PARSER, CHAT_TEMPLATE)
REFUSED_TOOL_FLAG = "--no" + AUTO_TOOL_CHOICE[1:]  # argparse's BooleanOptionalAction spelling
PATH_KEYS = ("cache_dir",)  # resolved against the config file's folder when it is loaded (resolve_paths)
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class PodConfig(BaseModel):
    """Everything ``manage_pod.py`` needs to create, watch and remove a pod. Built by ``load_pod_config``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # the original test plan's keys
    modelStoreId: str = Field(  # the test plan's spelling
        "qwen2.5-coder-32b-instruct-awq",
        min_length=1,
        description="The model to serve: an id of our Model Store (llmpod.pod.catalog), or its Hugging Face repo.",
    )
    gpu_type_id: str = Field(
        "NVIDIA RTX A6000", min_length=1, description="The RunPod GPU type id tried first, e.g. 'NVIDIA L40S'."
    )
    runtime_seconds: int = Field(
        28800,
        ge=1,
        le=7 * 86400,
        description="Hard expiry: the pod is terminated this long after it was created (at most 7 days).",
    )
    template_id: str | None = Field(
        None, min_length=1, description="A RunPod template id (templateId) to create the pod from, or null."
    )
    proxy_port: int = Field(8000, ge=1, le=65535, description="Where the local caching proxy listens (127.0.0.1).")
    cache_dir: str = Field("/tmp/llm_cache", min_length=1, description="The proxy's cache directory.")
    max_cache_size: int = Field(1000, ge=1, description="Cached answers kept by the proxy.")
    max_cache_bytes: int = Field(1073741824, ge=1024, description="Bytes of cached answers kept by the proxy.")
    enable_profiling: bool = Field(False, description="The proxy adds a Server-Timing header to every answer.")
    cache_key_rules: list[KeyRule] = Field(
        [],
        description="The proxy's cache-key rules besides the built-in ones: volatile parts of requests (a regex, "
        "scoped by roles and/or a tag block) left out of the key, never out of what is forwarded (docs/settings.md).",
    )
    cache_key_rules_off: list[str] = Field(
        [], description="Cache-key rules switched off by name (built-in or yours), or ['all'] for none."
    )
    # what a real pod needs
    provider: Literal["runpod", "local"] = Field(
        "runpod", description="'runpod' rents a GPU; 'local' runs `command` here instead (the mock vLLM server)."
    )
    gpu_type_ids: list[str] = Field(
        ["NVIDIA L40S", "NVIDIA A40"],
        description="Fallback GPU type ids, tried in order after gpu_type_id when RunPod has no capacity "
        "(ones the model does not fit, or over max_hourly_cost, are skipped).",
    )
    cloud_type: Literal["SECURE", "COMMUNITY"] = Field("SECURE", description="RunPod's Secure or Community cloud.")
    image: str = Field(
        "vllm/vllm-openai:v0.33.0", min_length=1, description="The vLLM image, with a pinned tag (not ':latest')."
    )
    min_cuda_version: str | None = Field(
        None,
        description="The CUDA (major.minor) the image is built for: RunPod places the pod only on a host whose "
        "driver runs it. null = known from the image's tag (llmpod.pod.images); needed for other "
        "images.",
    )
    container_disk_gb: int = Field(
        60, ge=10, le=2000, description="Container disk in GB: it holds the image and the downloaded weights."
    )
    max_model_len: int | None = Field(
        None, ge=128, description="vLLM --max-model-len; null for the Model Store's context length for the model."
    )
    vllm_args: list[str] = Field(
        [],
        description="Extra `vllm serve` flags, e.g. ['--enable-prefix-caching']; a --tool-call-parser or "
        "--chat-template here replaces the catalog's.",
    )
    hf_token_env: str = Field(
        "HF_TOKEN", description="The NAME of the environment variable holding a Hugging Face token (gated models)."
    )
    idle_timeout_seconds: int = Field(
        1800,
        ge=0,
        description="Terminate the pod after this long with no answer generated or served by the proxy; 0 = never.",
    )
    max_hourly_cost: float | None = Field(
        None, gt=0, description="Refuse GPU types whose list price per hour (on cloud_type) is higher; null = any."
    )
    ready_timeout_seconds: int = Field(
        1800, ge=1, description="How long the pod and vLLM may take to become ready before the pod is terminated."
    )
    watchdog_interval_seconds: float = Field(
        30.0, gt=0, le=3600, description="How often the watchdog checks expiry, idleness and the proxy."
    )
    # provider "local": the process standing in for a pod
    command: list[str] | None = Field(
        None,
        min_length=1,
        description="provider 'local': the program and its fixed arguments; null for the bundled mock vLLM server.",
    )
    args: list[str] = Field(
        [],
        description="provider 'local': arguments after `command`; may use {port} {model} {served_model_name} "
        "{max_model_len}. Empty for the mock server's defaults.",
    )
    env: dict[str, str] = Field({}, description="provider 'local': extra environment variables for the process.")
    # several models behind one proxy (issue 18): checked by llmpod.pod.models_config, which needs this class
    llmModels: dict[str, Any] = Field(
        {},
        description="Several models behind the proxy, by model id: a local `command`, an external "
        "`endpoints.base_url` or a RunPod `modelStoreId` (docs/settings.md); empty for the one model above.",
    )

    @property
    def gpu_candidates(self) -> list[str]:
        """``gpu_type_id`` then the fallbacks, each once, in order."""
        return list(dict.fromkeys([self.gpu_type_id, *self.gpu_type_ids]))

    @property
    def local_command(self) -> list[str]:
        """The program ``provider: "local"`` runs: ``command``, or the bundled mock vLLM server."""
        return list(self.command) if self.command else [sys.executable, *MOCK_SERVER]

    @field_validator("cache_key_rules_off")
    @classmethod
    def _known_rule_names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        check_rule_set(info.data.get("cache_key_rules") or [], value)
        return value

    @field_validator("cloud_type", mode="before")
    @classmethod
    def _upper_cloud(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) and value.upper() in ("SECURE", "COMMUNITY") else value

    @field_validator("modelStoreId", "gpu_type_id", "image", "cache_dir", "template_id")
    @classmethod
    def _no_blank(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value != value.strip()):
            raise ValueError("must not be blank or start or end with spaces")
        return value

    @field_validator("gpu_type_ids")
    @classmethod
    def _no_blank_items(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("must not contain blank GPU type ids")
        return value

    @field_validator("image")
    @classmethod
    def _pinned_image(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("must be an image reference without spaces")
        if "@sha256:" in value:
            return value
        last = value.rsplit("/", 1)[-1]
        if ":" not in last:
            raise ValueError("has no tag: pin a vLLM version such as vllm/vllm-openai:v0.33.0")
        if last.rsplit(":", 1)[1] in ("", "latest"):
            raise ValueError("must pin a version tag such as vllm/vllm-openai:v0.33.0, not ':latest'")
        return value

    @field_validator("min_cuda_version")
    @classmethod
    def _cuda_version(cls, value: str | None) -> str | None:
        # RunPod's CreateGpuConfig.minCudaVersion pattern; a bare major ("13") is refused there
        if value is not None and not re.fullmatch(r"\d+\.\d+", value):
            raise ValueError('must be a CUDA version as major.minor, e.g. "12.9"')
        return value

    @field_validator("hf_token_env")
    @classmethod
    def _env_var_name(cls, value: str) -> str:
        if value.startswith("hf_"):
            raise ValueError("looks like a token: write the NAME of the variable that holds it, e.g. HF_TOKEN")
        if not _ENV_NAME.match(value):
            raise ValueError("must be an environment variable name such as HF_TOKEN")
        return value

    @field_validator("vllm_args")
    @classmethod
    def _no_reserved_flags(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or "\n" in item:
                raise ValueError("must not contain empty items or line breaks")
            flag = item.split("=", 1)[0]
            if flag in RESERVED_VLLM_FLAGS:
                instead = RESERVED_VLLM_FLAGS[flag]
                hint = f"use the {instead} key instead" if instead else "manage_pod.py sets it itself"
                raise ValueError(f"must not contain {flag}: {hint}")
            if flag == REFUSED_TOOL_FLAG:
                raise ValueError(
                    f"must not contain {flag}: manage_pod.py turns tool calling on for models that have "
                    "it (agents send tools on every turn)"
                )
        for flag in VALUED_TOOL_FLAGS:
            uses = [i for i, item in enumerate(value) if item == flag or item.startswith(flag + "=")]
            if len(uses) > 1:
                raise ValueError(f"gives {flag} more than once")
            if uses and value[uses[0]] == flag and (uses[0] + 1 == len(value) or value[uses[0] + 1].startswith("-")):
                raise ValueError(f"gives {flag} without a value: write the flag and its value as two items")
        return value

    @field_validator("command")
    @classmethod
    def _command_items(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not item.strip() for item in value):
            raise ValueError("must not contain blank items")
        return value

    @field_validator("args")
    @classmethod
    def _known_placeholders(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                fields = [name for _, name, _, _ in string.Formatter().parse(item) if name is not None]
            except ValueError as exc:
                raise ValueError(f"has a malformed placeholder in {item!r} ({exc}; {{{{ is a literal {{)") from None
            unknown = [name for name in fields if name not in ARG_PLACEHOLDERS]
            if unknown:
                known = " ".join(f"{{{name}}}" for name in ARG_PLACEHOLDERS)
                raise ValueError(f"uses an unknown placeholder {{{unknown[0]}}} in {item!r} (known: {known})")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"has {name!r}, which is not an environment variable name")
        return value


FIELDS: tuple[str, ...] = tuple(PodConfig.model_fields)


def load_pod_config(path: Path, *, missing_ok: bool = False) -> PodConfig:
    """Read and check ``path``. Every problem is a one-line ``ConfigError``; a missing file is one too unless
    ``missing_ok``, in which case the defaults apply."""
    name = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return PodConfig()
        raise ConfigError(
            f"{name}: no such file; copy pod_config.json from the repository (or README.md) and edit it"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a JSON file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise ConfigError(f'{name}: is empty; it must hold a JSON object such as {{"modelStoreId": "..."}}')
    return resolve_paths(pod_config_from_dict(parse_json(name, text), source=name), path.parent, source=name)


def resolve_paths(config: PodConfig, folder: Path, source: str = "pod_config.json") -> PodConfig:
    """``config`` with its path settings (``PATH_KEYS``) absolute: ``~`` expanded, and a relative path taken
    against ``folder`` (the config file's), not wherever manage_pod.py happens to be started. Done once, here, so
    every process the pod manager starts gets the same absolute path."""
    updates: dict[str, str] = {}
    for key in PATH_KEYS:
        value = getattr(config, key)
        try:
            expanded = Path(value).expanduser()
        except RuntimeError:  # "~" with no home directory to expand it to
            raise ConfigError(f"{source}: {key}={short(value)}: the home directory (~) is not known here") from None
        resolved = os.path.abspath(folder / expanded)  # an absolute value is kept as it is: `/` drops `folder`
        if resolved != value:
            updates[key] = resolved
    return config.model_copy(update=updates) if updates else config


def pod_config_from_dict(data: Any, source: str = "pod_config.json") -> PodConfig:
    """Check an already parsed document (``source`` names it in messages)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must hold a JSON object {{...}} at the top level, not {json_type(data)}")
    for key, value in data.items():
        if key not in PodConfig.model_fields:
            raise ConfigError(f"{source}: unknown key {key}={short(value)}{suggest_key(key, PodConfig.model_fields)}")
    try:
        return PodConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if errors[1:] else ""
        raise ConfigError(f"{source}: {describe(errors[0])}{more}") from None


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise ``ConfigError`` unless ``host:port`` can be bound now (something else listens there, or it is a
    privileged port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if sys.platform != "win32":  # as uvicorn does: a port in TIME_WAIT is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    f"proxy_port {port} cannot be used: permission denied (ports below 1024 need "
                    "root); choose another proxy_port in pod_config.json"
                ) from None
            raise ConfigError(
                f"proxy_port {port} is in use by another program: {exc.strerror or exc} (stop it, "
                "or choose another proxy_port in pod_config.json)"
            ) from None
