"""The proxy's settings, as the proxy package names them: the model lives in the shared ``llmpod.proxy_settings``
(the pod manager builds the proxy's environment with it, and may not import this package)."""

from __future__ import annotations

from llmpod.proxy_settings import (
    DEFAULT_UPSTREAM,
    ENV_NAMES,
    GIB,
    MIB,
    SECRET_FIELDS,
    ProxySettings,
    is_loopback,
    upstream_base,
)

__all__ = [
    "DEFAULT_UPSTREAM",
    "ENV_NAMES",
    "GIB",
    "MIB",
    "SECRET_FIELDS",
    "ProxySettings",
    "is_loopback",
    "upstream_base",
]
