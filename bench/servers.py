"""The benchmark's servers, each a subprocess on 127.0.0.1 and a free port, started as users start them.

``ServerProcess.start`` returns the seconds from ``Popen`` to the first 200 from its health route;
``stop`` sends SIGTERM, then SIGKILL after a grace period. Every wait is bounded. The children run in their
own session, so a Ctrl-C in the terminal reaches only the benchmark, which then stops them itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from llmpod._net import free_port
from llmpod.proxy_settings import ENV_NAMES

ROOT = Path(__file__).resolve().parent.parent
# Variables our programs read: never inherited from the caller's shell, only set explicitly.
OUR_ENV_VARS = (
    *ENV_NAMES.values(),  # the proxy's settings, whatever they grow to (the settings contract)
    "RUNPOD_API_KEY",
    "VLLM_API_KEY",
    "MODEL_NAME",
    "PORT",
)
START_ATTEMPTS = 3


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OUR_ENV_VARS and not k.startswith("MOCK_")}
    env.update(extra)
    return env


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """One server subprocess: ``argv_for(port)`` is its command line."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        health_path: str = "/health",
        start_timeout: float = 60.0,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.cwd = cwd
        self._argv = list(argv)
        self._env = dict(env)
        self.log_path = log_path
        self.health_path = health_path
        self.start_timeout = start_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.started_at = 0.0  # perf_counter() at Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerError(f"{self.name} is not running")
        return self.process.pid

    def start(self) -> float:
        """Start and wait for the health route's 200; the seconds that took from ``Popen``."""
        for attempt in range(START_ATTEMPTS):
            self.port = free_port()
            argv = [a.replace("{port}", str(self.port)) for a in self._argv]
            env = {k: v.replace("{port}", str(self.port)) for k, v in self._env.items()}
            with open(self.log_path, "ab") as log:
                started = self.started_at = time.perf_counter()
                self.process = subprocess.Popen(
                    argv,
                    cwd=self.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self.startup_seconds = self._wait_healthy(started)
                return self.startup_seconds
            except ServerError:
                code = self.process.poll()
                self.stop()
                # exit 1 or 2 right away is a port someone else took in the meantime: try another one
                tail = self.log_tail().lower()
                if code in (1, 2) and ("listen" in tail or "bind" in tail) and attempt + 1 < START_ATTEMPTS:
                    continue
                raise
        raise ServerError(f"{self.name} did not start")  # pragma: no cover - the loop returns or raises

    def _wait_healthy(self, started: float) -> float:
        assert self.process is not None
        deadline = started + self.start_timeout
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(
                        f"{self.name} exited with {self.process.returncode} while starting: {self.log_tail()}"
                    )
                try:
                    response = client.get(f"{self.url}{self.health_path}")
                    if response.status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.005)
        raise ServerError(
            f"{self.name} did not answer {self.health_path} within {self.start_timeout:.0f} s: {self.log_tail()}"
        )

    def rss_kib(self) -> int:
        """VmRSS of the process, in KiB."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise ServerError(f"no VmRSS for {self.name} (pid {self.pid})")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 8.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


def mock_server(name: str, log_dir: Path, *switches: str) -> ServerProcess:
    argv = [sys.executable, str(ROOT / "mock_vllm_server.py"), "--port", "{port}", "--model", "m", *switches]
    return ServerProcess(name, argv, base_env({}), log_dir / f"{name}.log")


def proxy_server(
    name: str,
    log_dir: Path,
    upstream: ServerProcess,
    cache_dir: Path,
    max_entries: int = 10_000_000,
    max_bytes: int = 1 << 40,
    root: Path = ROOT,
) -> ServerProcess:
    """The proxy of the checkout at ``root`` (another one's, to compare before and after a change)."""
    env = base_env(
        {
            "RUNPOD_ENDPOINT": f"{upstream.url}/v1",
            "CACHE_DIR": str(cache_dir),
            "LOG_FILE": str(log_dir / f"{name}.requests.log"),
            "MAX_CACHE_SIZE": str(max_entries),
            "CACHE_SIZE_BYTES": str(max_bytes),
        }
    )
    argv = [sys.executable, str(root / "proxy_fastapi.py"), "--port", "{port}"]
    return ServerProcess(name, argv, env, log_dir / f"{name}.log", cwd=root)


def ceiling_server(name: str, log_dir: Path) -> ServerProcess:
    argv = [sys.executable, str(ROOT / "bench" / "ceiling_app.py"), "--port", "{port}"]
    return ServerProcess(name, argv, base_env({}), log_dir / f"{name}.log")


def floor_server(name: str, log_dir: Path, upstream: ServerProcess) -> ServerProcess:
    argv = [sys.executable, str(ROOT / "bench" / "floor_app.py"), "--port", "{port}", "--upstream", upstream.url]
    return ServerProcess(name, argv, base_env({}), log_dir / f"{name}.log")
