"""The fake RunPod's pod log stream, ``GET /v2/pods/{id}/logs``: it stays open, as RunPod's does.

RunPod answers with the backlog (``tail`` lines, or everything after ``Last-Event-ID`` or ``since``), then keeps
the connection open and sends new lines as the pod logs them; the spec documents no heartbeat and no end
event (runpod.md 8.5). So a client that reads it must stop on its own: a line count, a deadline, a read
timeout. The fake does the same: after the backlog it looks at the pod's log every ``POLL`` seconds and sends
what is new. The stream ends when the client leaves, when the fake stops, ``GONE_GRACE`` seconds after the pod
is gone (terminated or reclaimed: RunPod has nothing more to send), or after the ``log_stream_seconds`` setting
(0: the backlog alone, then the end, as a snapshot for tests that read a whole body).

Each line's ``id`` is ``<ts>/<sequence>`` (the spec's example), the sequence its place in the pod's whole log:
``FakePod.logs()`` only ever appends, so an id names the same line for as long as the pod lives.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from starlette.responses import StreamingResponse

from tests.fakes.fake_runpod_pods import FakePod, Problem, rfc3339

if TYPE_CHECKING:
    from tests.fakes.fake_runpod import FakeRunPod

__all__ = ["GONE_GRACE", "OPEN", "POLL", "backlog", "event", "logs_response"]

POLL = 0.1  # seconds between looks at a pod's log
GONE_GRACE = 1.0  # seconds a stream stays open once its pod is gone
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPEN: Counter[str] = Counter()  # pod id -> its log streams open now, in this process (for tests of their ends)


def _sequence(event_id: str) -> int | None:
    tail = event_id.rsplit("/", 1)[-1]
    return int(tail) if "/" in event_id and tail.isdigit() else None


def _query(params: Mapping[str, str]) -> tuple[int, str | None, str | None]:
    """``tail``, ``source`` and ``since``, or the 422 the spec's parameter schemas give."""
    tail, source, since = params.get("tail", "100"), params.get("source"), params.get("since")
    errors = []
    if not tail.isdigit() or int(tail) > 5000:
        errors.append(f"tail: must be an integer 0-5000, got {tail!r}")
    if source not in (None, "container", "system"):
        errors.append("source: value must be one of container, system")
    if since is not None and not _RFC3339.fullmatch(since):
        errors.append(f"since: must be an RFC 3339 date-time, got {since!r}")
    if errors:
        raise Problem(422, "Request validation failed.", errors=errors)
    return int(tail) if tail.isdigit() else 100, source, since


def backlog(
    lines: list[dict[str, str]], source: str | None, tail: int, since: str | None, last_id: str | None
) -> list[dict[str, str]]:
    """The lines sent first: after ``Last-Event-ID`` (which wins), from ``since`` on, or the last ``tail``."""
    lines = [line for line in lines if source in (None, line["source"])]
    if last_id:
        seq = _sequence(last_id)
        if seq is not None:
            return [line for line in lines if (_sequence(line["id"]) or 0) > seq]
        return [line for line in lines if line["ts"] > last_id]  # a bare timestamp, as the spec types it
    if since is not None:  # ts has whole seconds: a resume repeats that second's lines rather than lose any
        start = rfc3339(datetime.fromisoformat(since.replace("Z", "+00:00")).replace(microsecond=0))
        return [line for line in lines if line["ts"] >= start]
    return lines[len(lines) - tail :] if tail else []


def event(line: dict[str, str]) -> str:
    return f"id: {line['id']}\ndata: {json.dumps({k: line[k] for k in ('ts', 'source', 'line')})}\n\n"


async def _follow(
    fake: FakeRunPod, pod: FakePod, source: str | None, first: list[dict[str, str]], sent: int
) -> AsyncIterator[str]:
    """The backlog, then each new line, until one of the ends in the module docstring."""
    OPEN[pod.id] += 1
    try:
        if first:
            yield "".join(event(line) for line in first)
        ends_at = time.monotonic() + fake.settings.log_stream_seconds
        gone_at: float | None = None
        while not (fake.stopping.is_set() or time.monotonic() >= ends_at):
            if pod.gone or fake.pods.get(pod.id) is not pod:  # a reset forgets every pod
                gone_at = gone_at or time.monotonic()
                if time.monotonic() - gone_at >= GONE_GRACE:
                    return
            await asyncio.sleep(min(POLL, max(0.0, ends_at - time.monotonic())))
            new = [line for line in pod.logs() if (_sequence(line["id"]) or 0) > sent]
            if new:
                sent = _sequence(new[-1]["id"]) or sent
                wanted = [line for line in new if source in (None, line["source"])]
                if wanted:
                    yield "".join(event(line) for line in wanted)
    finally:  # the client left (the send failed, or the task was cancelled), or the stream ended
        OPEN[pod.id] -= 1


def logs_response(
    fake: FakeRunPod, pod: FakePod, params: Mapping[str, str], headers: Mapping[str, str]
) -> StreamingResponse:
    """The answer to ``GET /v2/pods/{id}/logs`` for a pod that exists."""
    tail, source, since = _query(params)
    everything = pod.logs()  # one look: what it holds is sent or skipped now, the rest is new
    first = backlog(everything, source, tail, since, headers.get("last-event-id"))
    sent = (_sequence(everything[-1]["id"]) or 0) if everything else 0
    return StreamingResponse(_follow(fake, pod, source, first, sent), media_type="text/event-stream", headers=_HEADERS)
