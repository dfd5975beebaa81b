"""Network failures in words a user can act on: "connection refused", "host name not found (DNS)".

httpx passes the operating system's text through (``[Errno 111] Connection refused``), which differs between
Linux, macOS and Windows and says little to most readers; ``network_reason`` turns the common ones into a few
words and falls back to the exception's own text. Nothing here can carry a secret: exception texts hold no
headers, and callers name the address themselves (without any user:password in it).
"""

from __future__ import annotations

import httpx

__all__ = ["network_reason"]

# The OS's words in the exception (Linux, macOS and Windows spellings) and what they mean
_REASONS = (
    (("connection refused", "errno 111", "errno 61", "winerror 10061"), "connection refused"),
    (
        (
            "name or service not known",
            "nodename nor servname",
            "temporary failure in name resolution",
            "no address associated",
            "getaddrinfo failed",
            "errno -2]",
            "errno -3]",
            "errno -5]",
        ),
        "host name not found (DNS)",
    ),
    (("network is unreachable", "errno 101"), "network unreachable"),
    (("no route to host", "errno 113"), "no route to host"),
    (("certificate verify failed", "certificate_verify_failed"), "TLS certificate not trusted"),
    (("connection reset", "errno 104"), "connection reset"),
    (("server disconnected", "connection closed", "peer closed"), "the server closed the connection"),
)
_TIMEOUT_PHASES = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "pool"),
)
_LIMIT = 200


def network_reason(exc: httpx.TransportError) -> str:
    """Why a request got no answer, in a few words; the exception's own text (one line) otherwise."""
    text = str(exc)
    for needles, reason in _REASONS:
        if any(needle in text.lower() for needle in needles):
            return reason
    for kind, phase in _TIMEOUT_PHASES:
        if isinstance(exc, kind):
            seconds = _timeout(exc, phase)
            return f"timed out after {seconds:g} s" if seconds is not None else "timed out"
    shown = " ".join(f"{type(exc).__name__}: {text}".split()) if text else type(exc).__name__
    return shown if len(shown) <= _LIMIT else shown[: _LIMIT - 3] + "..."


def _timeout(exc: httpx.TransportError, phase: str) -> float | None:
    """The limit that ran out, from the request's own timeout settings (None when not known)."""
    try:
        limits = exc.request.extensions.get("timeout") or {}
    except RuntimeError:  # an exception made without its request
        return None
    seconds = limits.get(phase)
    return float(seconds) if isinstance(seconds, (int, float)) else None
