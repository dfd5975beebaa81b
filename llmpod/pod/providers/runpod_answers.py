"""Reading RunPod's answers: how long a 429 says to wait, the backoff between retries, one-line descriptions
of error bodies and exceptions, and the events of a log stream (server-sent events).

``runpod_api.RunPodClient`` decides what to do with an answer; this module only reads it. Nothing here holds
or sees the API key: the client redacts every message it raises.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from datetime import timezone
from email.utils import parsedate_to_datetime

import httpx

from llmpod.pod.providers.runpod_models import SNIPPET

RETRY_AFTER_DEFAULT = 2.0
RETRY_AFTER_CAP = 60.0
BACKOFF_CAP = 30.0


def sse_lines(lines: Iterable[str]) -> Iterator[tuple[str | None, str]]:
    """(last event id, log line) for each event of a RunPod log stream (WHATWG SSE field rules)."""
    last_id: str | None = None
    data: list[str] = []
    for raw in lines:
        if not raw:
            if data:
                payload = "\n".join(data)
                data = []
                try:
                    event = json.loads(payload)
                except ValueError:
                    event = {"line": payload}  # not the documented shape: show it as it is
                if isinstance(event, dict) and isinstance(event.get("line"), str):
                    yield last_id, event["line"]
            continue
        name, _, value = raw.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value


def retry_after(value: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` header: integer seconds or an HTTP date."""
    if not value:
        return RETRY_AFTER_DEFAULT
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return RETRY_AFTER_DEFAULT
        if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are always GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return RETRY_AFTER_DEFAULT
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt + 1``: 1, 2, 4, 8 ... capped at ``BACKOFF_CAP``."""
    return min(2.0**attempt, BACKOFF_CAP)


def attempts(retries: int) -> str:
    """The " (gave up after N attempts)" tail of a final error; empty when nothing was retried."""
    return f" (gave up after {retries + 1} attempts)" if retries else ""


def describe(response: httpx.Response) -> str:
    """``<status> <title>: <detail> (<errors>)`` from a problem+json body, or a snippet of any other body."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and (body.get("title") or body.get("detail")):
        text = f"{status} {body.get('title') or response.reason_phrase}"
        detail = body.get("detail")
        if detail and detail != body.get("title"):
            text += f": {detail}"
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            text += " (" + "; ".join(str(e) for e in errors) + ")"
        return one_line(text, 600)
    shown = snippet(response.text)
    return f"{status} {response.reason_phrase}" + (f": {shown}" if shown else "")


def snippet(text: str) -> str:
    """A body shortened to one line of at most ``SNIPPET`` characters."""
    return one_line(text, SNIPPET)


def one_line(text: str, limit: int) -> str:
    """``text`` with its whitespace runs folded to single spaces, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exc_text(exc: Exception) -> str:
    """An exception as one short line: its type, and its message when it has one."""
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, SNIPPET)
