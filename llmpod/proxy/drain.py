"""Stopping the proxy (SIGTERM, Ctrl-C) without cutting anyone off mid-answer or leaving a traceback.

uvicorn alone, on a signal, stops accepting connections, closes idle keep-alive connections, waits
``timeout_graceful_shutdown`` for requests in flight, then cancels them: a stream simply stops (no error event, so
a client cannot tell a cut from a short answer) and a plain request gets a text/plain 500 and a traceback in the
log. Here, the drain:

1. refuses new connections at the socket (uvicorn closes the listening socket at once; a client's connect fails
   and an OpenAI SDK retries elsewhere or reports it) and closes idle keep-alive connections (uvicorn, too);
2. lets requests in flight finish for ``PROXY_DRAIN_SECONDS``: an answer completed then is delivered whole and
   cached as usual;
3. then interrupts what is left: a stream gets an OpenAI-shaped error event (the shape of an upstream failure
   mid-stream, ``flights.Flight.stream``) and ``data: [DONE]``, then a clean end of body; a request whose answer
   has not started gets an OpenAI-shaped JSON 503. The interrupted flights are cancelled with their listeners
   (the upstream stops generating) and never cached: only a complete answer is.

The hook into uvicorn is ``DrainingServer.shutdown`` (uvicorn's ``Server.shutdown``, 0.55): the one place that runs
in the event loop once a signal has been handled, before uvicorn starts waiting. tests/proxy/test_drain.py fails
loudly if an upgrade renames it. ``timeout_graceful_shutdown`` stays as a backstop a little after the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import orjson
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmpod.proxy.wire import error_body

log = logging.getLogger("llmpod.proxy")

# after the drain, uvicorn's own cancellation (which would log tracebacks) only catches what the drain missed
BACKSTOP_SECONDS = 3.0
# one last send to a client that does not read must not hold up the exit
LAST_SEND_SECONDS = 1.0
_DONE_TAIL = b"data: [DONE]\n\n"
SCOPE_KEY = "llmpod.drain"  # the request's _Request, for stopped_by_drain


class _Request:
    """One HTTP request in flight: what of its answer has gone out."""

    __slots__ = ("ended", "interrupted", "send_app", "sse", "started", "tail", "task")

    def __init__(self, send: Send, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.send_app = send
        self.started = False
        self.ended = False
        self.sse = False
        self.tail = b""  # the last bytes of the body sent: does it already end with [DONE]?
        self.interrupted = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.sse = any(
                name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                for name, value in message.get("headers", ())
            )
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.tail = (self.tail + body[-len(_DONE_TAIL) :])[-len(_DONE_TAIL) :]  # never a copy of the body
            if not message.get("more_body", False):
                self.ended = True
        await self.send_app(message)


class Drain:
    """ASGI middleware around the whole app that tracks HTTP requests in flight and interrupts them cleanly once
    the drain is over (module doc). ``begin()`` starts the drain."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self.draining = False
        self._requests: dict[asyncio.Task[Any], _Request] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        if self.draining:
            # uvicorn closes a connection once its answer is done, so a request seldom gets here (pipelined)
            await self._refuse(send, retry=True)
            return
        request = self._requests[task] = scope[SCOPE_KEY] = _Request(send, task)
        try:
            await self.app(scope, receive, request.send)
        except asyncio.CancelledError:
            if not request.interrupted:
                raise  # the client left, a send deadline, or uvicorn's backstop: not ours
            _uncancel(task)
            await self._end(request)
        else:
            if request.interrupted:  # the app caught our cancellation itself (a client that had just left)
                _uncancel(task)
        finally:
            del self._requests[task]

    def begin(self) -> None:
        """The server stops: interrupt what is still in flight ``seconds`` from now."""
        if self.draining:
            return
        self.draining = True
        if self._requests:
            log.info("stopping: %d request(s) in flight get up to %gs to finish", len(self._requests), self.seconds)
        self._timer = asyncio.get_running_loop().call_later(self.seconds, self.interrupt)

    def interrupt(self) -> None:
        """End every request still in flight (each in its own task: ``__call__`` catches the cancellation)."""
        self._timer = None
        if self._requests:
            log.warning(
                "stopping: %d request(s) still in flight after %gs: ended with a 503 error",
                len(self._requests),
                self.seconds,
            )
        for request in self._requests.values():
            if not request.interrupted:
                request.interrupted = True
                request.task.cancel()

    async def _end(self, request: _Request) -> None:
        """The answer an interrupted request gets, bounded: its client may not be reading."""
        message = (
            f"the proxy is shutting down and this answer did not finish within its {self.seconds:g}s drain "
            "(PROXY_DRAIN_SECONDS); nothing was cached: retry once it is back"
        )
        with contextlib.suppress(asyncio.TimeoutError, OSError, RuntimeError):
            if not request.started:
                await asyncio.wait_for(self._refuse(request.send_app, message=message), LAST_SEND_SECONDS)
            elif not request.ended:
                end = b""
                if request.sse and request.tail != _DONE_TAIL:
                    end = b"data: " + orjson.dumps(error_body(message, 503)) + b"\n\n" + _DONE_TAIL
                if end:
                    await asyncio.wait_for(
                        request.send_app({"type": "http.response.body", "body": end, "more_body": True}),
                        LAST_SEND_SECONDS,
                    )
                await asyncio.wait_for(
                    request.send_app({"type": "http.response.body", "body": b"", "more_body": False}),
                    LAST_SEND_SECONDS,
                )

    @staticmethod
    async def _refuse(send: Send, *, message: str | None = None, retry: bool = False) -> None:
        """An OpenAI-shaped 503; the connection closes after it (uvicorn's shutdown turned keep-alive off)."""
        body = orjson.dumps(error_body(message or "the proxy is shutting down", 503))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the drain started as soon as it begins to shut down (module doc)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.force_exit:  # a second Ctrl-C: uvicorn stops at once
            self.drain.begin()
        await super().shutdown(sockets)


def stopped_by_drain(scope: Scope) -> bool:
    """True once the drain has ended this request (its request log line then says 503, not 499)."""
    request = scope.get(SCOPE_KEY)
    return isinstance(request, _Request) and request.interrupted


def _uncancel(task: asyncio.Task[Any]) -> None:
    cancelling, uncancel = getattr(task, "cancelling", None), getattr(task, "uncancel", None)
    if cancelling is not None and uncancel is not None and cancelling():
        uncancel()  # 3.11+: the cancellation was ours, and it is handled
