"""``EventStream``: a streamed ASGI answer (SSE) that costs one small task, for the proxy and the mock.

Starlette's ``StreamingResponse`` runs an anyio task group per response (a task for the body, one listening
for the client leaving, cancel scopes around both) under uvicorn, which speaks ASGI 2.3: measured, that
was a large part of a streamed answer's cost on both sides of the proxy. Here the body is sent from the
request's own task, and one watcher task waits for ``http.disconnect``; when the client leaves, the watcher
cancels the sending task, which ends quietly. The body generator is always closed, right away, so whatever it
holds (a coalesced flight's listener slot, the mock's in-flight count) is released when the client goes,
not when the garbage collector gets to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EventStream(Response):
    """Send ``status_code`` and ``headers``, then each piece of ``body`` as it comes.

    (A ``Response`` subclass only so that routes may return it; none of Response's body handling is used.)
    """

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        status_code: int = 200,
        media_type: str = "text/event-stream",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = body
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.current_task()
        assert sender is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            sender.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for piece in self.stream:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left:
                raise  # cancelled from outside (the server stopping): not ours to swallow
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            cancelling, uncancel = getattr(sender, "cancelling", None), getattr(sender, "uncancel", None)
            if left and cancelling is not None and uncancel is not None and cancelling():
                uncancel()  # 3.11+: the cancellation was ours, and it is handled
            await self.stream.aclose()
