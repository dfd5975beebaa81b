"""HTTP load for the benchmark: wrk driven by generated Lua scripts, or a bounded asyncio fallback.

A ``Workload`` says what to POST: one fixed body, a counter-based unique body (``head + n + tail``), or a
cycle through a list of bodies. ``run_wrk`` writes it as a Lua script and parses wrk's report;
``run_python`` sends the same requests from asyncio sockets when wrk is not available (its figures are not
comparable with wrk's: the client costs more CPU than wrk on the same cores).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

WRK_PATH = "/usr/bin/wrk"
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class Workload:
    """What each request of a load run POSTs."""

    kind: str  # "fixed" | "unique" | "cycle"
    body: bytes = b""  # fixed
    head: bytes = b""  # unique: head + str(n) + tail, n = 1, 2, ...
    tail: bytes = b""
    bodies: tuple[bytes, ...] = ()  # cycle
    headers: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def fixed(body: bytes, headers: dict[str, str] | None = None) -> Workload:
        return Workload("fixed", body=body, headers=tuple((headers or {}).items()))

    @staticmethod
    def unique(head: bytes, tail: bytes, headers: dict[str, str] | None = None) -> Workload:
        return Workload("unique", head=head, tail=tail, headers=tuple((headers or {}).items()))

    @staticmethod
    def cycle(bodies: list[bytes], headers: dict[str, str] | None = None) -> Workload:
        if not bodies:
            raise ValueError("a cycle needs at least one body")
        return Workload("cycle", bodies=tuple(bodies), headers=tuple((headers or {}).items()))

    def body_for(self, n: int) -> bytes:
        """The body of request number ``n`` (from 1), as the Lua script builds it."""
        if self.kind == "fixed":
            return self.body
        if self.kind == "unique":
            return self.head + str(n).encode() + self.tail
        return self.bodies[(n - 1) % len(self.bodies)]

    def lua(self) -> str:
        lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
        # spaces inside the brackets: "[[" would open a Lua long string
        lines += [f"wrk.headers[ {_lua_string(k.encode())} ] = {_lua_string(v.encode())}" for k, v in self.headers]
        if self.kind == "fixed":
            lines.append(f"wrk.body = {_lua_string(self.body)}")
        elif self.kind == "unique":
            lines += [
                f"local head = {_lua_string(self.head)}",
                f"local tail = {_lua_string(self.tail)}",
                "local n = 0",
                "request = function()",
                "  n = n + 1",
                "  return wrk.format(nil, nil, nil, head .. n .. tail)",
                "end",
            ]
        else:
            lines.append("local bodies = {")
            lines += [f"  {_lua_string(b)}," for b in self.bodies]
            lines += [
                "}",
                "local i = 0",
                "request = function()",
                "  i = i % #bodies + 1",
                "  return wrk.format(nil, nil, nil, bodies[i])",
                "end",
            ]
        return "\n".join(lines) + "\n"


def _lua_string(data: bytes) -> str:
    """A Lua long-bracket literal holding ``data`` verbatim."""
    text = data.decode()
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


@dataclass
class LoadResult:
    tool: str
    connections: int
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0})
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def error_text(self) -> str:
        parts = [f"{self.non_2xx} non-2xx"] if self.non_2xx else []
        parts += [f"{n} {kind}" for kind, n in self.socket_errors.items() if n]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("raw")
        data["errors"] = self.errors
        return data


# ------------------------------------------------------------------------------------------------- wrk
def find_wrk() -> str | None:
    found = shutil.which("wrk")
    if found:
        return found
    return WRK_PATH if os.access(WRK_PATH, os.X_OK) else None


def ensure_wrk(log: Any = print) -> str | None:
    """wrk's path; when it is missing, one ``apt-get install -y wrk`` (only as root with apt-get)."""
    found = find_wrk()
    if found:
        return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        log("wrk not found: running `apt-get install -y wrk` (once)")
        try:
            result = subprocess.run(
                ["apt-get", "install", "-y", "wrk"],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
            if result.returncode != 0:
                log(
                    f"apt-get install wrk failed (exit {result.returncode}): "
                    f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}"
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log(f"apt-get install wrk failed: {exc}")
        return find_wrk()
    log("wrk not found (and not root with apt-get to install it)")
    return None


def wrk_version(wrk: str) -> str:
    try:
        result = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (result.stdout or result.stderr).strip().splitlines()
    version = first[0].split(" Copyright")[0].strip() if first else "unknown"
    return version.removeprefix("wrk ").strip()


def wrk_seconds(duration: float) -> int:
    """wrk takes whole seconds only; at least 1."""
    return max(1, round(duration))


def run_wrk(wrk: str, url: str, workload: Workload, connections: int, duration: float, script_dir: Path) -> LoadResult:
    script = script_dir / f"load-{uuid.uuid4().hex[:12]}.lua"
    script.write_text(workload.lua())
    seconds = wrk_seconds(duration)
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", str(script), url]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        script.unlink(missing_ok=True)
    if result.returncode != 0 or "Requests/sec" not in result.stdout:
        raise RuntimeError(f"wrk failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()[:500]}")
    return parse_wrk(result.stdout, connections)


def parse_wrk(output: str, connections: int) -> LoadResult:
    res = LoadResult(tool="wrk", connections=connections, raw=output)
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None:
        raise ValueError("no Requests/sec line in wrk's output")
    res.rps = float(match.group(1))
    match = re.search(r"(\d+) requests in " + _TIME, output)
    if match:
        res.requests = int(match.group(1))
        res.seconds = float(match.group(2)) * _UNIT_SECONDS[match.group(3)]
    for pct, attr in (("50", "p50_ms"), ("75", "p75_ms"), ("90", "p90_ms"), ("99", "p99_ms")):
        match = re.search(rf"^\s*{pct}(?:\.0+)?%\s+{_TIME}\s*$", output, re.MULTILINE)
        if match:
            setattr(res, attr, float(match.group(1)) * _UNIT_SECONDS[match.group(2)] * 1000)
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if match:
        res.non_2xx = int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        res.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups()), strict=True))
    return res


# ------------------------------------------------------------------------------------------------- fallback
def run_python(url: str, workload: Workload, connections: int, duration: float) -> LoadResult:
    """The same load from asyncio sockets (HTTP/1.1 keep-alive), bounded by ``duration`` plus timeouts."""
    return asyncio.run(_python_load(url, workload, connections, duration))


async def _python_load(url: str, workload: Workload, connections: int, duration: float) -> LoadResult:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    extra = "".join(f"{k}: {v}\r\n" for k, v in workload.headers)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
    res = LoadResult(tool="python", connections=connections)
    latencies: list[float] = []
    counter = itertools.count(1)
    started = time.perf_counter()
    deadline = started + duration

    async def worker() -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, asyncio.TimeoutError):
            res.socket_errors["connect"] += 1
            return
        try:
            while time.perf_counter() < deadline:
                body = workload.body_for(next(counter))
                t0 = time.perf_counter()
                try:
                    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    await writer.drain()
                except OSError:
                    res.socket_errors["write"] += 1
                    return
                try:
                    status = (await asyncio.wait_for(read_http_response(reader), 10))[0]
                except asyncio.TimeoutError:
                    res.socket_errors["timeout"] += 1
                    return
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    res.socket_errors["read"] += 1
                    return
                latencies.append(time.perf_counter() - t0)
                if not 200 <= status < 400:
                    res.non_2xx += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    res.seconds = time.perf_counter() - started
    res.requests = len(latencies)
    res.rps = res.requests / res.seconds if res.seconds else 0.0
    ms = sorted(x * 1000 for x in latencies)
    res.p50_ms, res.p75_ms, res.p90_ms, res.p99_ms = (percentile(ms, q) for q in (50, 75, 90, 99))
    return res


async def read_http_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from ``reader``: status, lower-cased headers, body (Content-Length or chunked)."""
    header = await reader.readuntil(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            fields[name.strip().lower()] = value.strip()
    if "chunked" in fields.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append((await reader.readexactly(size + 2))[:size])
            if size == 0:
                break
        return status, fields, b"".join(parts)
    return status, fields, await reader.readexactly(int(fields.get("content-length", "0")))


def percentile(ordered: list[float], q: float) -> float | None:
    """Linear-interpolated ``q``-th percentile of an already sorted list."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
