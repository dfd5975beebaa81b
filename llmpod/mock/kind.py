"""The mock's mark: every answer carries ``x-llmpod-kind: mock`` (llmpod/server_kind.py says why).

A header on every answer (errors, /health and /v1/models too), added outside everything else so no route can
forget it; no JSON shape changes. ``mark_kind=False`` makes the mock look exactly like a real vLLM, which
sends no such header (the fake RunPod's pods, and tests of what the proxy does with a real pod).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmpod.mock.state import MockState
from llmpod.server_kind import KIND_HEADER, MOCK

_MARK = (KIND_HEADER.encode(), MOCK.encode())


class KindMarkMiddleware:
    def __init__(self, app: ASGIApp, mock: MockState) -> None:
        self.app = app
        self.mock = mock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.mock.settings.mark_kind:
            await self.app(scope, receive, send)
            return

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), _MARK]}
            await send(message)

        await self.app(scope, receive, marked)
