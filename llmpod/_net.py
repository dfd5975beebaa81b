"""Small networking helpers shared by the pod manager, the tests and the benchmark."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a process that must bind it itself (another may take it first:
    callers that can bind port 0 themselves should)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
