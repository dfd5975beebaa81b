"""``EventStream``: a streamed ASGI answer (SSE) that costs one small task, for the proxy and the mock.

Starlette's ``StreamingResponse`` runs an anyio task group per response (a task for the body, one listening
for the client leaving, cancel scopes around both) under uvicorn, which speaks ASGI 2.3: measured, that
was a large part of a streamed answer's cost on both sides of the proxy. Here the body is sent from the
request's own task, and one watcher task waits for ``http.disconnect``; when the client leaves, the watcher
cancels the sending task, which ends quietly. The body generator is always closed, right away, so whatever it
holds (a coalesced flight's listener slot, the mock's in-flight count) is released when the client goes,
not when the garbage collector gets to it.

HTTP/1.0 knows no chunked encoding, and uvicorn's httptools protocol would chunk a body sent without a length:
an HTTP/1.0 client gets the whole stream at once, with a ``Content-Length``.

``SendDeadline`` bounds how long one send to a client may block (a client that stopped reading): past it, the
task serving the request is cancelled, so the answer is abandoned and what it holds is released.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send


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
            if scope.get("http_version") == "1.0":
                body = b"".join([piece async for piece in self.stream])
                headers = [*self.raw_headers, (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
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


class SendDeadline:
    """Wraps an ASGI ``send``: one send blocked ``timeout`` seconds cancels the task that serves the request.

    One timer per request, re-armed at most once per ``timeout`` (not a ``wait_for`` task per chunk). The server
    task catches the cancellation and calls ``settle()``: True means it was ours (the client stalled).
    """

    def __init__(self, send: Send, timeout: float) -> None:
        self._send = send
        self.timeout = timeout
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._sending_since: float | None = None
        self.started = False  # a message went out: the status line can no longer change
        self.stalled = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        since, now = self._sending_since, self._loop.time()
        if since is not None and now - since >= self.timeout and self._task is not None:
            self.stalled = True
            self._timer = None
            self._task.cancel()
            return
        wait = self.timeout if since is None else self.timeout - (now - since)
        self._timer = self._loop.call_later(wait, self._check)

    async def send(self, message: Message) -> None:
        self.started = True
        self._sending_since = self._loop.time()
        try:
            await self._send(message)
        finally:
            self._sending_since = None

    def settle(self) -> bool:
        """After a CancelledError: True (and the cancellation marked handled) if it was the deadline's."""
        if not self.stalled:
            return False
        cancelling = getattr(self._task, "cancelling", None)
        uncancel = getattr(self._task, "uncancel", None)
        if cancelling is not None and uncancel is not None and cancelling():
            uncancel()  # 3.11+: the cancellation was ours, and it is handled
        return True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
