"""``llmModels`` in ``pod_config.json`` (issue 18): several models behind one proxy, in FluidMCP's shape.

One entry per model id::

    "llmModels": {
      "chat": {"command": "python3", "args": ["-m", "llmpod.mock", "--model", "chat", "--port", "8001"],
               "endpoints": {"base_url": "http://127.0.0.1:8001/v1"}},
      "docs": {"endpoints": {"base_url": "http://10.0.0.5:8000/v1"}},
      "big":  {"modelStoreId": "qwen2.5-coder-32b-instruct-awq", "gpu_type_id": "NVIDIA L40S"}
    }

- ``command`` (+ ``args``, ``env``, ``endpoints.base_url``): a local process manage_pod.py starts (cwd: the config
  file's folder), waits for, supervises and stops;
- only ``endpoints.base_url``: an OpenAI-compatible server someone else runs;
- ``modelStoreId``: a RunPod pod, with the per-pod keys of the top level (unset ones inherited); made, watched and
  terminated by llmpod.pod.model_pods.

Every problem is one ``ConfigError`` line naming the file and the entry, before anything starts. The checks that
depend on the moment (a port in use) are ``check_ports_free``, called by the run that starts processes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmpod.backends import MODEL_ID, Backend
from llmpod.errors import ConfigError
from llmpod.pod.config import PodConfig, check_port_free
from llmpod.pod.config_messages import describe, short, suggest_key

# the top level's per-pod keys an entry with modelStoreId may set (unset ones inherit the top level's)
POD_KEYS = (
    "gpu_type_id",
    "gpu_type_ids",
    "cloud_type",
    "image",
    "min_cuda_version",
    "container_disk_gb",
    "max_model_len",
    "vllm_args",
    "template_id",
    "runtime_seconds",
    "idle_timeout_seconds",
    "max_hourly_cost",
    "ready_timeout_seconds",
    "hf_token_env",
)
LOCAL_HOSTS = ("127.0.0.1", "localhost")
RestartPolicy = Literal["on-failure", "always", "never"]


class _Endpoints(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    base_url: str = Field(min_length=1)


class _Entry(BaseModel):
    """One ``llmModels`` entry as written (the per-pod keys are checked by ``PodConfig`` itself)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    command: str | None = Field(None, min_length=1)
    args: list[str] = []
    env: dict[str, str] = {}
    endpoints: _Endpoints | None = None
    modelStoreId: str | None = Field(None, min_length=1)
    served_model: str | None = Field(None, min_length=1)
    aliases: list[str] = []
    restart_policy: RestartPolicy = "on-failure"
    max_restarts: int = Field(5, ge=0, le=1000)
    restart_window_seconds: float = Field(600.0, gt=0)
    start_timeout_seconds: float = Field(120.0, gt=0, le=3600)


ENTRY_KEYS = (*_Entry.model_fields, *POD_KEYS)


@dataclass(frozen=True)
class ModelSpec:
    """One model, checked: what manage_pod.py starts (``local``), leaves alone (``external``) or rents (``runpod``)."""

    id: str
    kind: Literal["local", "external", "runpod"]
    base_url: str | None  # None only for a RunPod entry (its pod's URL is known once it runs)
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    served_model: str | None = None
    aliases: tuple[str, ...] = ()
    restart_policy: RestartPolicy = "on-failure"
    max_restarts: int = 5
    restart_window_seconds: float = 600.0
    start_timeout_seconds: float = 120.0
    pod: PodConfig | None = None  # a RunPod entry's settings, the top level's where it sets none

    @property
    def port(self) -> int | None:
        return _port(self.base_url) if self.base_url else None

    def backend(self, state_file: str | None) -> Backend:
        assert self.base_url is not None
        return Backend(
            id=self.id,
            base_url=self.base_url,
            served_model=self.served_model,
            aliases=self.aliases,
            state_file=state_file if self.kind == "local" else None,
        )


def load_models(config: PodConfig, folder: Path, source: str = "pod_config.json") -> tuple[ModelSpec, ...]:
    """Check every ``llmModels`` entry of ``config`` (read from ``folder``); the first problem is a ConfigError."""
    specs = tuple(_spec(config, folder, source, model_id, raw) for model_id, raw in config.llmModels.items())
    ports: dict[int, str] = {config.proxy_port: "proxy_port"}
    names: dict[str, str] = {}
    for spec in specs:
        for name in (spec.id, *spec.aliases):
            if name in names:
                raise ConfigError(f"{source}: llmModels.{spec.id}: the name {name!r} is also {names[name]}'s")
            names[name] = spec.id
        if spec.kind != "local" or spec.port is None:
            continue
        if spec.port in ports:
            other = ports[spec.port]
            what = "proxy_port" if other == "proxy_port" else f"llmModels.{other}"
            raise ConfigError(f"{source}: llmModels.{spec.id}: port {spec.port} is also {what}'s")
        ports[spec.port] = spec.id
    return specs


def check_ports_free(specs: tuple[ModelSpec, ...], source: str = "pod_config.json") -> None:
    """Before starting: every local entry's port must be free (an entry of ours already running is skipped by
    the caller)."""
    for spec in specs:
        if spec.kind == "local" and spec.port is not None:
            try:
                check_port_free(spec.port, _host(spec.base_url or ""))
            except ConfigError:
                raise ConfigError(
                    f"{source}: llmModels.{spec.id}: port {spec.port} ({spec.base_url}) is in use by another program"
                ) from None


def _spec(config: PodConfig, folder: Path, source: str, model_id: str, raw: Any) -> ModelSpec:
    where = f"{source}: llmModels.{model_id}"
    if not MODEL_ID.match(model_id):
        raise ConfigError(
            f"{source}: llmModels: {short(model_id)} is not a model id (1-128 letters, digits and ._:/@+-, "
            "starting with a letter or digit)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a JSON object {{...}}")
    for key, value in raw.items():
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key {key}={short(value)}{suggest_key(key, ENTRY_KEYS)}")
    try:
        entry = _Entry.model_validate({k: v for k, v in raw.items() if k not in POD_KEYS})
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe(exc.errors()[0])}") from None
    pod_keys = [key for key in raw if key in POD_KEYS]
    base_url = entry.endpoints.base_url.rstrip("/") if entry.endpoints else None
    common: dict[str, Any] = {
        "id": model_id,
        "served_model": entry.served_model,
        "aliases": tuple(entry.aliases),
        "restart_policy": entry.restart_policy,
        "max_restarts": entry.max_restarts,
        "restart_window_seconds": entry.restart_window_seconds,
        "start_timeout_seconds": entry.start_timeout_seconds,
    }
    if base_url is not None:
        _check_url(where, base_url)
    if entry.modelStoreId is not None:
        if entry.command is not None or base_url is not None:
            raise ConfigError(f"{where}: has modelStoreId and command or endpoints: a RunPod entry has neither")
        inherited = {key: getattr(config, key) for key in POD_KEYS}
        try:
            pod = PodConfig.model_validate(
                {**inherited, **{k: raw[k] for k in pod_keys}, "modelStoreId": entry.modelStoreId}
            )
        except ValidationError as exc:
            raise ConfigError(f"{where}: {describe(exc.errors()[0])}") from None
        return ModelSpec(kind="runpod", base_url=None, pod=pod, **common)
    if pod_keys:
        raise ConfigError(f"{where}: {pod_keys[0]} is a RunPod setting: it goes only with modelStoreId")
    if base_url is None:
        raise ConfigError(f"{where}: needs endpoints.base_url (with or without command), or modelStoreId")
    if entry.command is None:
        if entry.args or entry.env:
            raise ConfigError(f"{where}: has args or env but no command to give them to")
        return ModelSpec(kind="external", base_url=base_url, **common)
    if _host(base_url) not in LOCAL_HOSTS:
        raise ConfigError(f"{where}: a local command's base_url must be on this machine (127.0.0.1), not {base_url}")
    if urlsplit(base_url).port is None:
        raise ConfigError(f"{where}: base_url {base_url} names no port: write the one the command listens on")
    for name in entry.env:
        if not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ConfigError(f"{where}: env has {name!r}, which is not an environment variable name")
    program = _find_program(entry.command, folder)
    if program is None:
        raise ConfigError(
            f"{where}: command {entry.command!r} is not found (not on PATH, nor executable relative to {folder})"
        )
    return ModelSpec(kind="local", base_url=base_url, argv=(program, *entry.args), env=dict(entry.env), **common)


def _find_program(command: str, folder: Path) -> str | None:
    """The program's path: a name with a slash is taken from the config's folder, a bare name from PATH."""
    if os.sep in command:
        path = folder / Path(command).expanduser()
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(command)


def _check_url(where: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}: endpoints.base_url {short(url)} is not an http(s) URL such as http://127.0.0.1:8001/v1"
        )
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ConfigError(f"{where}: endpoints.base_url {short(url)} has a bad port") from None


def _host(url: str) -> str:
    return urlsplit(url).hostname or ""


def _port(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port or ((443 if parts.scheme == "https" else 80) if parts.hostname else None)
