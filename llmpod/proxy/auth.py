"""The proxy's API key: with ``PROXY_API_KEY`` set, every route but /health needs it.

One check for the whole app: ``ProxyApp`` applies it before it dispatches to a generation endpoint or to
FastAPI's router, so the two kinds of route cannot drift apart.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from llmpod.proxy.wire import error_response

OPEN_PATHS = frozenset({"/health"})  # the watchdog and load balancers probe it without the key


class ProxyKey:
    """The key, sent as Bearer or in the ``api-key`` header that Continue and Azure-style clients send.
    Compared in constant time."""

    def __init__(self, key: SecretStr) -> None:
        self._key = key.get_secret_value().encode()
        self._denied = error_response(
            "missing or wrong API key for this proxy (PROXY_API_KEY)", 401, headers={"WWW-Authenticate": "Bearer"}
        )

    def __repr__(self) -> str:
        return "ProxyKey(**********)"  # never the key itself

    def allows(self, scope: Scope) -> bool:
        if scope["path"] in OPEN_PATHS:
            return True
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            token = headers.get(b"api-key") or headers.get(b"x-api-key") or b""
        return hmac.compare_digest(token.strip(), self._key)

    async def deny(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._denied(scope, receive, send)
