"""Bounds on the proxy's client connections: a deadline for each request head, caps per client and in total.

Why a hook into uvicorn: uvicorn arms no timer on a connection until its first response is complete, and a
client's first byte of a next request cancels the keep-alive timer, so a connection that never finishes its
request head is kept forever (slowloris: a thousand of them exhaust macOS's default 256 descriptors and lock out
every real client). Its ``limit_concurrency`` does not help: it counts those connections too, and answers the
real clients 503. So ``guarded_protocol`` subclasses uvicorn's HTTP protocol (httptools or h11, whichever
``http="auto"`` picks), and this module is the one place that knows uvicorn's internals. It relies on the
``asyncio.Protocol`` interface, on ``client`` and ``transport`` (set by ``connection_made``), and on ``cycle``: the
current request (None before the first one), a new object once a request head is complete, with
``response_complete``, ``response_started``, ``more_body`` (the request body is still coming) and ``scope``.
tests/proxy/test_connections.py fails loudly if an upgrade changes that.

- A connection must deliver a complete request head within ``header_timeout`` of connecting, or of the first
  byte of its next request; past it, it is closed (with a 408 if it had sent part of a head). The head's size is
  bounded by the parsers (h11 16 KiB, httptools' llhttp 80 KiB: a 400); idle keep-alive connections are closed
  by uvicorn's ``timeout_keep_alive`` (5 s).
- At a cap (per client address, or in total), the oldest connection still waiting for its head is closed to make
  room, then the oldest whose request body stalled for ``header_timeout``, then the oldest idle keep-alive one (a
  client reconnects, as after any keep-alive close); only when every connection is working on a request is the
  new one refused with an OpenAI-shaped 503. A slow-header (or slow-body) attacker thus cannot lock out a client
  that sends its request promptly.
- ``reset_connection(scope)`` drops a connection at once, unsent data and all: a stalled reader cut by
  ``SendDeadline`` would otherwise keep its descriptor while uvicorn waits for the send buffer to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from llmpod.proxy.wire import error_body

log = logging.getLogger("llmpod.proxy.connections")

EXTENSION = "llmpod.connection"  # scope["extensions"][EXTENSION]["reset"]: drop this request's connection now
LINGER = 2.0  # seconds a refused connection is kept so the client can read its 503 before the close
FD_RESERVE = 64  # descriptors kept for everything but client connections: listener, log, cache files, loop
WANTED_FDS = 4096  # the soft descriptor limit asked for at start (macOS starts processes at 256)
REPORT_EVERY = 60.0  # seconds between two warnings about closed connections (an attacker must not flood the log)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    per_client: int
    total: int


def raise_descriptor_limit(wanted: int = WANTED_FDS) -> int | None:
    """Raise the soft limit on open descriptors towards ``wanted`` (never above the hard limit); the soft limit
    now in force, None where there is no such limit to read."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return None if soft == resource.RLIM_INFINITY else int(soft)


def connection_limits(header_timeout: float, per_client: int, total: int, fd_limit: int | None) -> ConnectionLimits:
    """The caps in force: each client connection may need a descriptor for the upstream too, so the total stays
    within half of what the descriptor limit leaves, and a client's cap within the total."""
    if fd_limit is not None:
        total = min(total, max(8, (fd_limit - FD_RESERVE) // 2))
    return ConnectionLimits(header_timeout, min(per_client, total), total)


def reset_connection(scope: MutableMapping[str, Any]) -> bool:
    """Drop the connection that carries this request, at once (a reset); False if the server offers no way."""
    extension = scope.get("extensions", {}).get(EXTENSION)
    if not extension:
        return False
    extension["reset"]()
    return True


class ConnectionGuard:
    """The open connections of one server, oldest first, in total and by client address."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: dict[_Guarded, None] = {}
        self._by_client: dict[str, dict[_Guarded, None]] = {}
        self.closed: Counter[str] = Counter()  # why connections were closed or refused, for the warning
        self._reported: Counter[str] = Counter()
        self._reported_at = -REPORT_EVERY

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: _Guarded) -> bool:
        """Count ``conn`` in, closing older connections to make room at a cap; False: it is refused."""
        peers = self._by_client.setdefault(conn.peer, {})
        for pool, cap in ((peers, self.limits.per_client), (self._open, self.limits.total)):
            while len(pool) >= cap:
                victim = _oldest_waiting(pool)
                if victim is None:
                    self.note("refused", conn.peer)
                    if not peers:
                        del self._by_client[conn.peer]
                    return False
                victim.drop("shed at a cap")
        peers[conn] = None
        self._open[conn] = None
        return True

    def forget(self, conn: _Guarded) -> None:
        self._open.pop(conn, None)
        peers = self._by_client.get(conn.peer)
        if peers is not None:
            peers.pop(conn, None)
            if not peers:
                del self._by_client[conn.peer]

    def note(self, reason: str, peer: str) -> None:
        """Count a connection closed for ``reason``; warn at most once a minute, with the counts since."""
        self.closed[reason] += 1
        now = time.monotonic()
        if now - self._reported_at < REPORT_EVERY:
            return
        since = self.closed - self._reported
        self._reported, self._reported_at = self.closed.copy(), now
        log.warning(
            "client connections closed (latest from %s): %s; open now %d (caps: %d per client, %d in total, "
            "request head within %ss)",
            peer,
            ", ".join(f"{reason} {count}" for reason, count in sorted(since.items())),
            len(self._open),
            self.limits.per_client,
            self.limits.total,
            self.limits.header_timeout,
        )


def _oldest_waiting(pool: dict[_Guarded, None]) -> _Guarded | None:
    """The oldest connection still sending its request head, else the oldest whose request body has stalled,
    else the oldest idle keep-alive one; None when every connection is working on a request."""
    now = time.monotonic()
    stalled = idle = None
    for conn in pool:
        if conn.waiting_head:
            return conn
        if stalled is None and conn.body_stalled(now):
            stalled = conn
        elif idle is None and conn.idle:
            idle = conn
    return stalled or idle


def _answer(status: int, reason: str, message: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps(error_body(message, status))
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n".encode()
        + extra
        + b"connection: close\r\n\r\n"
        + body
    )


class _Guarded(asyncio.Protocol):
    """Mixed in before uvicorn's HTTP protocol class by ``guarded_protocol``."""

    guard: ClassVar[ConnectionGuard]
    # uvicorn's, set by its connection_made and its request parsing (see the module's docstring)
    transport: asyncio.Transport
    client: tuple[str, int] | None
    cycle: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peer = ""
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._data_at = time.monotonic()
        self._refused = False

    @property
    def waiting_head(self) -> bool:
        return self._head_timer is not None

    @property
    def idle(self) -> bool:
        cycle = self.cycle
        return self._head_timer is None and cycle is not None and bool(cycle.response_complete)

    def body_stalled(self, now: float) -> bool:
        """A request whose body has not come on for ``header_timeout``: not closed for it (a slow link may pause,
        and uvicorn stops reading while the app is busy), but the connection may make room at a cap."""
        cycle = self.cycle
        return (
            cycle is not None
            and bool(cycle.more_body)
            and not cycle.response_started
            and now - self._data_at >= self.guard.limits.header_timeout
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peer = self.client[0] if self.client else ""
        if self.guard.admit(self):
            self._arm()
            return
        self._refused = True
        self.transport.write(
            _answer(
                503,
                "Service Unavailable",
                "too many connections from this client: retry shortly",
                b"retry-after: 1\r\n",
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # a lingering close: closed at once, the client's request still unread would turn our close into a reset
        # that can destroy the 503 before the client reads it
        asyncio.get_running_loop().call_later(LINGER, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._data_at = time.monotonic()
        before = self.cycle
        # the first bytes of a next request on a kept-alive connection: timed unless its head is complete already
        starting = self._head_timer is None and (before is None or before.response_complete)
        super().data_received(data)
        if self.cycle is not before:  # a request head is complete
            self._disarm()
            scope = getattr(self.cycle, "scope", None)
            if isinstance(scope, dict):
                scope.setdefault("extensions", {})[EXTENSION] = {"reset": self.reset}
        elif starting:
            self._arm()
            self._head_bytes = len(data)
        elif self._head_timer is not None:
            self._head_bytes += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_bytes = 0
        self._head_timer = asyncio.get_running_loop().call_later(self.guard.limits.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        timeout = self.guard.limits.header_timeout
        answer = _answer(408, "Request Timeout", f"request head not complete within {timeout} s")
        self.drop("header timeout", answer if self._head_bytes else b"")

    def drop(self, reason: str, answer: bytes = b"") -> None:
        """Close this connection now (it stops counting at once), with ``answer`` if it can go out at once."""
        self._disarm()
        self.guard.forget(self)
        self.guard.note(reason, self.peer)
        transport = self.transport
        if transport.is_closing():
            return
        if answer and not transport.get_write_buffer_size():
            transport.write(answer)
        if transport.get_write_buffer_size():
            transport.abort()  # close() would wait for the buffer to drain, for as long as the client does not read
        else:
            transport.close()

    def reset(self) -> None:
        """Drop the connection at once, unsent data and all: the client sees a reset and the descriptor is freed
        (a plain close would keep it, and the kernel's send buffer, while a stalled client does not read)."""
        self._disarm()
        self.guard.forget(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def guarded_protocol(base: type[asyncio.Protocol], limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HTTP protocol class) with the bounds above; one guard for every connection it makes."""
    return type(f"Guarded{base.__name__}", (_Guarded, base), {"guard": ConnectionGuard(limits)})


def auto_protocol() -> type[asyncio.Protocol]:
    """The protocol uvicorn's ``http="auto"`` would use: httptools' when it is installed, else h11's."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol
