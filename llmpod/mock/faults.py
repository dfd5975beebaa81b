"""The mock's connection cut (``die_after_chunks``): the exception that drops a connection mid-body, the body that
drops it before its first byte, and the uvicorn log filter that keeps those deliberate cuts from printing
tracebacks. ``llmpod.mock.server`` decides when to cut; this module owns how.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx


class ConnectionCut(httpx.RemoteProtocolError):
    """Raised inside a response body to drop the connection, as a dying server does.

    Over a socket uvicorn closes the connection mid-body, so clients see an incomplete message. It derives
    from httpx's error so that an in-process client (``httpx.ASGITransport``) sees the same exception type.
    """


class HideCuts(logging.Filter):
    """Keep uvicorn from printing a traceback for every cut we cause on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc: Any = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, ConnectionCut):
                return False
            inner = getattr(exc, "exceptions", None)  # an ExceptionGroup from a task group
            exc = inner[0] if inner and len(inner) == 1 else None
        return True


def install_log_filter() -> None:
    """Add ``HideCuts`` to uvicorn's error log, once however many apps are created."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, HideCuts) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(HideCuts())


class CutBody:
    """A response body that fails before its first byte: the client gets headers, then a closed socket."""

    def __aiter__(self) -> CutBody:
        return self

    async def __anext__(self) -> bytes:
        raise ConnectionCut("mock vLLM cut the connection (die_after_chunks)")
