"""ASGI middleware that holds the fake RunPod to the official spec (tests/fakes/runpod_spec.py).

Every ``/v2`` request that reaches the fake (llmpod's, or a test's) is checked before the app sees it, and every
answer as it leaves: a JSON body when complete, a log stream event by event as it is sent (it may stay open for
minutes). Each violation is passed to ``record`` as one line; the fake keeps them for the tests to fail on
(``FakeRunPod.spec_violations``, ``GET /fake/state`` as ``specViolations``). The ``/fake`` and ``/proxy`` routes
are the fake's own, not RunPod's API, and are let through unchecked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.fakes.runpod_spec import RunPodSpec, sse_events

__all__ = ["SpecCheck"]

Scope = dict[str, Any]
Message = dict[str, Any]
_SPEC: RunPodSpec | None = None  # parsed once per process: every fake shares it


def shared_spec() -> RunPodSpec:
    global _SPEC
    if _SPEC is None:
        _SPEC = RunPodSpec()
    return _SPEC


class SpecCheck:
    """Check requests to, and responses from, ``app`` under ``prefix`` against the spec."""

    def __init__(
        self, app: Any, record: Callable[[str], None], prefix: str = "/v2", spec: RunPodSpec | None = None
    ) -> None:
        self.app, self.record, self.prefix = app, record, prefix
        self.spec = spec or shared_spec()

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path")  # as sent: a pod id with a "/" in it stays one segment
        path = raw.decode("latin-1").split("?", 1)[0] if raw else path
        method = scope["method"]
        body, complete, replay = await _read_body(receive)
        if not complete:  # the client left mid-request (a killed manage_pod.py): it never reached RunPod whole
            await self.app(scope, replay, send)
            return
        if self.spec.match(method, path) is None:  # no answer to check it against either
            self.record(f"request {method} {path}: no such operation in the spec")
            await self.app(scope, replay, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        for error in self.spec.request_errors(
            method, path, scope.get("query_string", b""), body, headers.get("content-type")
        ):
            self.record(f"request {error}")
        answer = _Answer(self, method, path)

        async def checked_send(message: Message) -> None:
            answer.see(message)
            await send(message)

        try:
            await self.app(scope, replay, checked_send)
        finally:
            answer.finish()


class _Answer:
    """One response as it passes: its start, then its body, checked as soon as there is enough of it."""

    def __init__(self, check: SpecCheck, method: str, path: str) -> None:
        self.check, self.method, self.path = check, method, path
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False

    @property
    def streaming(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            if self.streaming:
                self._events()
            if not message.get("more_body", False):
                self.finish()

    def _events(self) -> None:
        """Check the complete events received so far, keep the rest for later."""
        events, rest = sse_events(self.body.decode(errors="replace"))
        for event in events:
            for error in self.check.spec.log_event_errors(event):
                self.check.record(f"response {self.method} {self.path} -> {self.status}: {error}")
        self.body = bytearray(rest.encode())

    def finish(self) -> None:
        if self.done or self.status is None:  # never started: the server answers 500 itself, outside the API
            return
        self.done = True
        body = b"" if self.streaming else bytes(self.body)  # a stream's events were checked as they went
        content_type = self.headers.get("content-type")
        errors = self.check.spec.response_errors(self.method, self.path, self.status, content_type, body, self.headers)
        if self.streaming and self.body.strip():
            errors.append(f"the stream ended inside an event: {bytes(self.body[:200])!r}")
        for error in errors:
            self.check.record(f"response {error}")


async def _read_body(receive: Callable[[], Any]) -> tuple[bytes, bool, Callable[[], Any]]:
    """The request body, whether it came whole, and a ``receive`` that hands the app what was read and then
    listens on (for the client's disconnect, which ends a log stream)."""
    first: list[Message] = []
    while True:
        message = await receive()
        first.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    body = b"".join(m.get("body", b"") for m in first if m["type"] == "http.request")
    complete = first[-1]["type"] == "http.request"  # else the client left before sending it all

    async def replay() -> Message:
        if first:
            return first.pop(0)
        return await receive()  # type: ignore[no-any-return]

    return body, complete, replay
