"""Hostile input for the proxy and for manage_pod.py's files, and the judges that say whether it ended cleanly.

Used by test_bad_input.py and test_security.py: OpenAI-error judging of an HTTP answer, raw-socket requests
whose headers lie, the proxy as a subprocess (its RSS read from /proc), and counting secrets in artefacts.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.servers import ServerProcess, base_env

ROOT = Path(__file__).resolve().parents[2]
HONEST_5XX = frozenset({502, 504})  # the upstream failed, and the proxy says so
ERROR_FIELDS = {"message", "type", "param", "code"}


def answer_problem(status: int, content_type: str, body: bytes) -> str | None:
    """Why an HTTP answer of the proxy is not clean (None when it is): a 5xx other than an honest 502/504
    naming the upstream, an error body that is not OpenAI-shaped, or a traceback anywhere."""
    text = body[:4000].decode("utf-8", "replace")
    if "Traceback" in text:
        return f"{status} carries a traceback"
    if status < 400:
        return None
    if status >= 500 and status not in HONEST_5XX:
        return f"{status}: {text[:120]!r}"
    if not content_type.startswith("application/json"):
        return f"{status} error is {content_type or 'untyped'}, not JSON: {text[:80]!r}"
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} body is not OpenAI-shaped: {text[:120]!r}"
    if not isinstance(error, dict) or set(error) != ERROR_FIELDS or not error.get("message"):
        return f"{status} error object is not OpenAI-shaped: {text[:120]!r}"
    if status in HONEST_5XX and "upstream" not in str(error["message"]):
        return f"{status} does not say the upstream failed: {text[:120]!r}"
    return None


# ------------------------------------------------------------------------------------------ raw sockets
@dataclass
class RawOutcome:
    status: int | None  # None: no HTTP answer at all
    head: bytes  # status line and headers, as received
    closed: bool  # the server closed the connection (a clean end for a request it cannot parse)
    hung: bool  # neither an answer nor a close within the bound

    def problem(self) -> str | None:
        """Lying framing must get a 4xx or a clean close; never a 5xx, never a hang."""
        if self.hung:
            return "no answer and no close within the bound (a hang)"
        if self.status is not None and not 400 <= self.status < 500 and self.status != 200:
            return f"answered {self.status}: {self.head[:120]!r}"
        return None


def raw_request(port: int, payload: bytes, *, half_close: bool = False, bound: float = 10.0) -> RawOutcome:
    """Send ``payload`` as it is on a fresh connection (then shut our side if ``half_close``); read what comes
    back until the server closes, or the first answer's head has arrived and the server goes quiet, or ``bound``
    seconds pass."""
    received = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=bound) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if b"\r\n\r\n" in received:
                    break  # answered; the connection stays open for the next request (keep-alive)
                continue
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            received += data
    head = received.split(b"\r\n\r\n", 1)[0]
    status = None
    if head.startswith(b"HTTP/1."):
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = None
    return RawOutcome(status=status, head=head, closed=closed, hung=status is None and not closed)


# ------------------------------------------------------------------------------------------ the proxy process
def proxy_process(tmp_path: Path, upstream: str, **env: str) -> ServerProcess:
    """``proxy_fastapi.py`` as a user runs it (uvicorn's own HTTP parser, not the tests' h11), not yet started."""
    settings = {
        "RUNPOD_ENDPOINT": upstream,
        "CACHE_DIR": str(tmp_path / "proxy_cache"),
        "LOG_FILE": str(tmp_path / "proxy_requests.log"),
        "UPSTREAM_TIMEOUT": "20",
        **env,
    }
    argv = [sys.executable, str(ROOT / "proxy_fastapi.py"), "--port", "{port}"]
    return ServerProcess("proxy", argv, base_env(settings), tmp_path / "proxy_process.log")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------------------------------ secrets
def secret_sightings(artefacts: Mapping[str, bytes], secrets: Mapping[str, str]) -> list[str]:
    """``"<secret label> in <artefact>"`` for every artefact holding a secret, raw or URL-encoded."""
    from urllib.parse import quote

    found = []
    for label, secret in secrets.items():
        forms = {secret.encode(), quote(secret, safe="").encode()}
        for where, data in artefacts.items():
            count = sum(data.count(form) for form in forms)
            if count:
                found.append(f"{label} x{count} in {where}")
    return found


def read_all(paths: Iterable[Path]) -> dict[str, bytes]:
    """The bytes of every readable regular file among ``paths``, by path."""
    result = {}
    for path in paths:
        try:
            if path.is_file():
                result[str(path)] = path.read_bytes()
        except OSError:
            continue
    return result
