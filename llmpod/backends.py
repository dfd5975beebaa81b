"""Several models behind one proxy (issue 18): the contract between the pod manager, which starts and supervises
each model's server, and the proxy, which routes requests to them by model id. A shared top-level module: neither
``llmpod.pod`` nor ``llmpod.proxy`` imports the other.

- ``Backend``: one model's server as the proxy sees it, handed over in ``PROXY_BACKENDS`` (JSON, one object per
  model; ``ProxySettings.backends``). No backends means the single ``RUNPOD_ENDPOINT`` upstream, as before.
- ``BackendState``: what the supervisor (the pod manager's watchdog) knows and the proxy cannot see by probing:
  that a process is being restarted, how often it was, why it is down, that the user stopped it, and where a
  RunPod model's pod now is (a replaced pod has a new URL and key). Written
  atomically to ``Backend.state_file`` (0600); the proxy reads it when it reports a model's health. An external
  server (no state file) is judged by the proxy's own health checks alone.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer, field_validator

from llmpod._files import atomic_write
from llmpod.errors import ConfigError
from llmpod.server_kind import ServerKind

__all__ = ["Backend", "BackendState", "Lifecycle", "backends_from_env", "backends_to_env", "read_state", "write_state"]

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}\Z")
Lifecycle = Literal["starting", "healthy", "restarting", "down", "stopped"]


class Backend(BaseModel):
    """One model behind the proxy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str  # the model id clients name, and the ``/llm/{id}/`` route
    base_url: str  # the server's OpenAI base URL, ending in /v1
    served_model: str | None = None  # what the server itself calls the model, when not ``id`` (the body is rewritten)
    aliases: tuple[str, ...] = ()  # other names clients may use for this model
    api_key: SecretStr | None = Field(None, repr=False)  # the server's own key (a pod's vLLM key), if it has one
    kind: ServerKind | None = None  # mock or vllm, as for UPSTREAM_KIND; None: learnt from the server's answers
    state_file: str | None = None  # where the supervisor writes this model's ``BackendState``; None: external

    @field_validator("id")
    @classmethod
    def _model_id(cls, value: str) -> str:
        if not MODEL_ID.match(value):
            raise ValueError("a model id is 1-128 letters, digits and ._:/@+- and starts with a letter or digit")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_base(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL such as http://127.0.0.1:8001/v1")
        return value

    @property
    def upstream_model(self) -> str:
        return self.served_model or self.id


class BackendState(BaseModel):
    """A supervised model's state, as its supervisor last wrote it."""

    model_config = ConfigDict(extra="forbid")

    state: Lifecycle
    since: float = Field(default_factory=time.time)  # when it entered this state (epoch seconds)
    restarts: int = 0  # restarts in the policy's current window
    last_error: str | None = None  # one line, secret-free: why it last died or is down
    pid: int | None = None
    cost_per_hour: float = 0.0
    # a RunPod model whose pod was replaced: the new pod's URL and vLLM key. The proxy sends the model's requests
    # there from then on, without a restart that would interrupt the other models (llmpod.proxy.routing)
    base_url: str | None = None
    api_key: SecretStr | None = Field(None, repr=False)

    @field_serializer("api_key", when_used="json")
    def _reveal_key(self, value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value else None  # only into the 0600 state file


def backends_to_env(backends: tuple[Backend, ...]) -> str:
    """``PROXY_BACKENDS``'s value: JSON holding the servers' keys in clear (the proxy's own environment only)."""
    if not backends:
        return ""
    return json.dumps(
        [
            {
                **backend.model_dump(exclude={"api_key"}, exclude_defaults=True),
                **({"api_key": backend.api_key.get_secret_value()} if backend.api_key else {}),
            }
            for backend in backends
        ]
    )


def backends_from_env(value: str) -> tuple[Backend, ...]:
    """Read ``PROXY_BACKENDS``; a bad value is one ``ConfigError`` line naming the entry (never a key's value)."""
    if not value.strip():
        return ()
    try:
        listed = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"PROXY_BACKENDS is not JSON: {exc}") from None
    if not isinstance(listed, list):
        raise ConfigError("PROXY_BACKENDS must be a JSON list of models")
    backends: list[Backend] = []
    for number, item in enumerate(listed):
        name = item.get("id", f"#{number}") if isinstance(item, dict) else f"#{number}"
        try:
            backends.append(Backend.model_validate(item))
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "entry"
            raise ConfigError(f"PROXY_BACKENDS model {name!r}: {where}: {problem['msg']}") from None
    names = [n for b in backends for n in (b.id, *b.aliases)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"PROXY_BACKENDS names {', '.join(repeated)} more than once")
    return tuple(backends)


def write_state(path: str | os.PathLike[str], state: BackendState) -> None:
    """Replace the state file atomically (0600): the proxy never reads half of it."""
    atomic_write(path, state.model_dump_json().encode(), mode=0o600, fsync=False)


def read_state(path: str | os.PathLike[str]) -> BackendState | None:
    """The state last written, or None when there is none yet or it does not parse (the proxy's probes decide)."""
    try:
        return BackendState.model_validate_json(Path(path).read_bytes())
    except (OSError, ValidationError):
        return None
