"""The proxy's settings: the one contract between the pod manager and the proxy process.

The proxy reads them from its environment (``ProxySettings.from_env``); the pod manager builds that environment
from a ``ProxySettings`` (``to_env``), so a bad value is refused by the same validation before the proxy is
started. A shared top-level module: ``llmpod.pod`` may not import ``llmpod.proxy``.

The names are the original test plan's (``RUNPOD_ENDPOINT``, ``CACHE_DIR``, ``MAX_CACHE_SIZE``,
``CACHE_SIZE_BYTES``) plus our own. ``from_env`` validates every value and turns the first problem into a
one-line ``ConfigError`` that names the variable and the bad value (never a secret's value).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from llmpod.backends import Backend, backends_from_env, backends_to_env
from llmpod.errors import ConfigError
from llmpod.key_rule_spec import KeyRule, check_rule_set
from llmpod.server_kind import ServerKind

DEFAULT_UPSTREAM = "http://127.0.0.1:8001/v1"
GIB = 1024**3
DRAIN_SECONDS = 5.0
# what a stopped proxy needs after its drain: ending the last requests (1 s each, at once), stopping the flights and
# flushing the cache writes
STOP_MARGIN_SECONDS = 5.0
MIB = 1024**2

# field name -> environment variable
ENV_NAMES: dict[str, str] = {
    "upstream_url": "RUNPOD_ENDPOINT",
    "cache_dir": "CACHE_DIR",
    "max_cache_entries": "MAX_CACHE_SIZE",
    "max_cache_bytes": "CACHE_SIZE_BYTES",
    "host": "PROXY_HOST",
    "port": "PROXY_PORT",
    "upstream_api_key": "UPSTREAM_API_KEY",
    "proxy_api_key": "PROXY_API_KEY",
    "upstream_timeout": "UPSTREAM_TIMEOUT",
    "log_file": "LOG_FILE",
    "enable_profiling": "ENABLE_PROFILING",
    "max_body_bytes": "MAX_BODY_BYTES",
    "upstream_tool_calling": "UPSTREAM_TOOL_CALLING",
    "tool_capable_models": "TOOL_CAPABLE_MODELS",
    "send_timeout": "PROXY_SEND_TIMEOUT",
    "allowed_hosts": "PROXY_ALLOWED_HOSTS",
    "drain_seconds": "PROXY_DRAIN_SECONDS",
    "upstream_kind": "UPSTREAM_KIND",
    "header_timeout": "PROXY_HEADER_TIMEOUT",
    "max_connections": "PROXY_MAX_CONNECTIONS",
    "max_client_connections": "PROXY_MAX_CLIENT_CONNECTIONS",
    "key_rules": "CACHE_KEY_RULES",
    "key_rules_off": "CACHE_KEY_RULES_OFF",
    "backends": "PROXY_BACKENDS",
    "health_interval": "PROXY_HEALTH_INTERVAL",
    "hit_rate_window": "HIT_RATE_WINDOW",
    "cost_per_hour": "POD_COST_PER_HOUR",
}
SECRET_FIELDS = {"upstream_api_key", "proxy_api_key"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_ENDPOINT_SUFFIXES = ("/chat/completions", "/completions", "/models")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def upstream_base(url: str) -> str:
    """The OpenAI base URL (``…/v1``) for a full endpoint URL or a base URL."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    for suffix in _ENDPOINT_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    path = path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ProxySettings(BaseModel):
    """Everything the proxy needs to run. Build it with ``from_env`` or directly in tests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    upstream_url: str = DEFAULT_UPSTREAM
    cache_dir: Path = Path("/tmp/llm_cache")
    max_cache_entries: int = Field(1000, ge=1)
    max_cache_bytes: int = Field(GIB, ge=1024)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    upstream_api_key: SecretStr | None = None
    proxy_api_key: SecretStr | None = None
    upstream_timeout: float = Field(300.0, gt=0, le=3600)
    log_file: Path | None = Path("/tmp/proxy_fastapi.log")
    enable_profiling: bool = False
    max_body_bytes: int = Field(32 * MIB, ge=1024)
    # set by manage_pod.py from the catalog: False = the upstream runs without a tool-call parser, so requests
    # with tools get the proxy's one-line 400 naming tool_capable_models; None = unknown, everything is forwarded
    upstream_tool_calling: bool | None = None
    tool_capable_models: tuple[str, ...] = ()
    # a client that stops reading its answer is cut after this long blocked on one send: otherwise it stays in
    # flight forever, holding its flight and keeping the pod from going idle
    send_timeout: float = Field(60.0, gt=0, le=3600)
    # names besides this machine's (localhost, 127.0.0.1, [::1], the bound host) that Host and Origin may carry:
    # anything else is refused, so a page whose domain is rebound to 127.0.0.1 cannot read the cache
    allowed_hosts: tuple[str, ...] = ()
    # on SIGTERM/Ctrl-C, requests in flight get this long to finish before they are ended with a 503 error; the pod
    # manager waits this plus STOP_MARGIN_SECONDS before it kills the proxy (proxy_stop_grace)
    drain_seconds: float = Field(DRAIN_SECONDS, ge=0, le=600)
    # what the pod manager started behind the proxy (llmpod/server_kind.py): the cache key names it, so the mock's
    # answers are never served for a real pod. The upstream's own mark wins once the proxy sees one; None (run by
    # hand) = learnt from the upstream's first answer, and no cached answer is served until then
    upstream_kind: ServerKind | None = None
    # a connection that does not finish its request head in time is closed, and at a cap the oldest connections
    # still sending their heads make room first (slowloris): see llmpod/proxy/connections.py
    header_timeout: float = Field(10.0, gt=0, le=3600)
    max_connections: int = Field(1024, ge=1)
    max_client_connections: int = Field(256, ge=1)
    # cache-key normalisation (llmpod.key_rule_spec): the user's rules besides the built-in ones, and the names of
    # rules switched off ("all" = none applies: every key is the request's own)
    key_rules: tuple[KeyRule, ...] = ()
    key_rules_off: tuple[str, ...] = ()
    # several models behind one proxy (llmpod/backends.py, issue 18): routed by model id; none = the single upstream
    backends: tuple[Backend, ...] = ()
    # seconds between two health probes of each backend (its /health and /v1/models); a request that finds a backend
    # unreachable probes it at once, so this only bounds how soon a recovery (or a silent death) is noticed
    health_interval: float = Field(10.0, gt=0, le=3600)
    # /metrics' recent hit rate is over this many last cache lookups (besides all-time and the last hour)
    hit_rate_window: int = Field(100, ge=1, le=100_000)
    # the pod's price, set by manage_pod.py (RunPod's costPerHr; 0 for --local): what a hit saved in dollars is
    # the seconds its generation took times this
    cost_per_hour: float = Field(0.0, ge=0, le=10_000)

    @field_validator("upstream_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8001/v1")
        return value.strip()

    @field_validator("upstream_api_key", "proxy_api_key")
    @classmethod
    def _no_blank_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # a key pasted with a trailing newline would otherwise make every request fail with 401
        if value is None or not value.get_secret_value().strip():
            return None
        return SecretStr(value.get_secret_value().strip())

    @model_validator(mode="after")
    def _rule_names(self) -> ProxySettings:
        check_rule_set(self.key_rules, self.key_rules_off)
        return self

    @property
    def upstream_base(self) -> str:
        """``http(s)://host:port/…/v1``: where the OpenAI routes live upstream."""
        return upstream_base(self.upstream_url)

    @property
    def upstream_root(self) -> str:
        """Where vLLM's own routes (``/health``, ``/tokenize``) live: the base without ``/v1``."""
        base = self.upstream_base
        return base[: -len("/v1")] if base.endswith("/v1") else base

    def check_bind_safety(self) -> None:
        """Refuse to expose the proxy (and the paid pod behind it) to the network without a key."""
        if not is_loopback(self.host) and self.proxy_api_key is None:
            raise ConfigError(
                f"PROXY_HOST={self.host} is not a loopback address: set PROXY_API_KEY so that only "
                "clients with the key can use the proxy, or bind 127.0.0.1"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ProxySettings:
        """Read the settings from ``environ`` (default ``os.environ``); ``overrides`` win (CLI flags)."""
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for field, name in ENV_NAMES.items():
            if name in env:
                raw[field] = env[name]
        if "enable_profiling" in raw:
            raw["enable_profiling"] = _parse_bool("ENABLE_PROFILING", raw["enable_profiling"])
        if "upstream_tool_calling" in raw:
            value = raw["upstream_tool_calling"].strip()
            raw["upstream_tool_calling"] = _parse_bool("UPSTREAM_TOOL_CALLING", value) if value else None
        if "upstream_kind" in raw:
            raw["upstream_kind"] = raw["upstream_kind"].strip().lower() or None
        if "key_rules" in raw:
            raw["key_rules"] = _parse_rules(raw["key_rules"])
        if "backends" in raw:
            raw["backends"] = backends_from_env(raw["backends"])
        for field in ("tool_capable_models", "allowed_hosts", "key_rules_off"):
            if field in raw:
                raw[field] = tuple(n.strip() for n in raw[field].split(",") if n.strip())
        raw.update({k: v for k, v in overrides.items() if v is not None})
        if raw.get("log_file") in ("", "-"):  # an override too: the pod manager's proxy logs to stderr only
            raw["log_file"] = None
        try:
            settings = cls(**raw)
        except ValidationError as exc:
            raise _one_line(exc, raw) from None
        settings.check_bind_safety()
        return settings

    def to_env(self) -> dict[str, str]:
        """The environment from which ``from_env`` reads these settings back: what the proxy process gets.

        Every variable is set, a missing value as "" (which ``from_env`` reads as None), so nothing of that
        name is inherited from the caller's environment by mistake. It holds the secrets' values: never log it.
        """
        env: dict[str, str] = {}
        for field, name in ENV_NAMES.items():
            value = getattr(self, field)
            if value is None:
                env[name] = ""
            elif isinstance(value, SecretStr):
                env[name] = value.get_secret_value()
            elif isinstance(value, bool):
                env[name] = "1" if value else "0"
            elif field == "backends":
                env[name] = backends_to_env(value)
            elif field == "key_rules":
                env[name] = json.dumps([rule.model_dump(exclude_defaults=True) for rule in value]) if value else ""
            elif isinstance(value, tuple):
                env[name] = ",".join(value)
            else:
                env[name] = str(value)
        return env


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use 1/0, true/false)")


def _parse_rules(value: str) -> Any:
    """``CACHE_KEY_RULES``: a JSON list of rule objects (``[]`` or empty for none)."""
    if not value.strip():
        return ()
    try:
        rules = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"CACHE_KEY_RULES is not JSON ({exc}): it is a list of rule objects") from None
    if not isinstance(rules, list):
        raise ConfigError("CACHE_KEY_RULES must be a JSON list of rule objects")
    return rules


def _one_line(exc: ValidationError, raw: Mapping[str, Any]) -> ConfigError:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "?"
    name = ENV_NAMES.get(field, field)
    message = str(error["msg"]).removeprefix("Value error, ")
    if field == "key_rules" or not error["loc"]:  # a rule (or the rule set): named by where, not by the whole list
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:])
        return ConfigError(f"{'CACHE_KEY_RULES' + where if error['loc'] else 'cache key rules'}: {message}")
    if field in SECRET_FIELDS:
        return ConfigError(f"{name} is invalid: {message}")
    return ConfigError(f"{name}={raw.get(field)!r} is invalid: {message}")


def proxy_stop_grace(drain_seconds: str | None) -> float:
    """Seconds to wait after SIGTERM before killing a proxy whose environment says ``PROXY_DRAIN_SECONDS=drain_seconds``
    (None, unset or unreadable: the default): its drain, then STOP_MARGIN_SECONDS to end and flush."""
    try:
        drain = float(drain_seconds) if drain_seconds else DRAIN_SECONDS
    except ValueError:
        drain = DRAIN_SECONDS
    if not 0 <= drain <= 600:  # out of range (or nan): such a proxy refused to start with it
        drain = DRAIN_SECONDS
    return drain + STOP_MARGIN_SECONDS
