"""Run ASGI apps on real loopback sockets for tests, in a thread, with no process to leak."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from llmpod._net import free_port as free_port  # the repo's one free-port helper, offered with the others


class LoopbackServer:
    """Serve ``app`` on 127.0.0.1 and a free port for the duration of a ``with`` block.

    ``http="httptools"`` is what the proxy runs with in production (``http="auto"`` with httptools installed).
    """

    def __init__(self, app: Any, *, startup_timeout: float = 10.0, http: str | type[Any] = "h11") -> None:
        self._app = app
        self._startup_timeout = startup_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", loop="asyncio", http=http)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"loopback-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"test server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; with ``grace``, answers still in flight after that many seconds are cut."""
        if grace is not None:
            self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")
