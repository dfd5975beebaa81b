"""What a web page in the user's browser must not do to the proxy: DNS rebinding and simple-request CSRF.

A page whose domain is rebound to 127.0.0.1 sends its own name in ``Host``; a page on any site sends its
origin in ``Origin``. ``HostGuard`` refuses both unless the name is this machine's (or one the user allows in
``PROXY_ALLOWED_HOSTS``), on every route. An HTML form can POST ``text/plain`` without a CORS preflight, so
the generation routes take ``application/json`` only: 415 otherwise. vLLM 0.33.0 refuses the same bodies
(``validate_json_request`` in vllm/entrypoints/serve/utils/api_utils.py, read from the wheel) with a 400 whose
message says "Unsupported Media Type: Only 'application/json' is allowed" (older releases sent a 415); the proxy
answers before the body is read, with the status that names the problem; clients retry neither.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from llmpod.proxy.wire import error_response

LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
JSON_TYPE = b"application/json"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class HostGuard:
    """The allowed ``Host`` values as raw bytes, computed once: the hit path does one set lookup."""

    def __init__(self, bound_host: str, port: int, allowed: tuple[str, ...] = ()) -> None:
        names = {n.lower() for n in (*LOCAL_NAMES, _bracketed(bound_host), *map(_bracketed, allowed)) if n}
        self._names = frozenset(n.encode() for n in names)
        self._hosts = self._names | frozenset(f"{n}:{port}".encode() for n in names)
        self._bad_host = error_response(
            "Host header names no address of this machine (set PROXY_ALLOWED_HOSTS to allow a name)", 421
        )
        self._bad_origin = error_response(
            "cross-origin requests from browsers are refused (set PROXY_ALLOWED_HOSTS to allow a name)", 403
        )

    def _allowed(self, netloc: bytes) -> bool:
        netloc = netloc.lower()
        if netloc in self._hosts:  # the usual case: one set lookup
            return True
        # another port of an allowed name: the socket may be bound elsewhere than settings.port (uvicorn
        # --port, tests), and a rebinding page cannot choose the name, only the port
        name, _, port = netloc.rpartition(b":")
        return bool(name) and port.isdigit() and name in self._names

    def _origin_ok(self, origin: bytes) -> bool:
        scheme, sep, rest = origin.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return False  # "null" (sandboxed frames, file: pages) and anything odd
        return self._allowed(rest.rstrip(b"/"))

    async def check(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """True if the request may go on; otherwise the refusal has been sent."""
        host = origin = None
        for key, value in scope["headers"]:
            if key == b"host":
                host = value
            elif key == b"origin":
                origin = value
        # no Host at all is an HTTP/1.0 client, not a browser: browsers always send one
        if host is not None and not self._allowed(host):
            await self._bad_host(scope, receive, send)
            return False
        if origin is not None and not self._origin_ok(origin):
            await self._bad_origin(scope, receive, send)
            return False
        return True


_UNSUPPORTED = error_response(
    "Unsupported Media Type: only 'application/json' is allowed (send Content-Type: application/json)", 415
)


async def json_only(scope: Scope, receive: Receive, send: Send) -> bool:
    """True for a JSON body (``application/json``, parameters such as charset allowed); otherwise sends 415."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            if value.partition(b";")[0].strip().lower() == JSON_TYPE:
                return True
            break
    await _UNSUPPORTED(scope, receive, send)
    return False
