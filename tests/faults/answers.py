"""What a client of the proxy got, judged from its side: its own complete answer, a clean error, or neither.

The mock vLLM server is deterministic (the same request gives the same text, which echoes the prompt), so
the answer every request should get is computed here with the mock's own generator, and a client can tell a
complete answer from a partial, mixed-up or stale one. ``Tally`` counts the verdicts in the fault ledger's
terms; ``check_cache_dir`` audits what the proxy left on disk.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from llmpod.mock.generation import generate
from llmpod.mock.requests import parse_chat
from tests.support.helpers import SERVED_MODEL

HONEST_5XX = frozenset({502, 504})  # the upstream's own failure, named as such by the proxy
ERROR_FIELDS = {"message", "type", "param", "code"}
MAX_NOTES = 8


def chat_body(prompt: str, *, stream: bool, max_tokens: int = 64) -> dict[str, Any]:
    """A chat request naming the served model, so the proxy forwards it unchanged (but for stream fields)."""
    body: dict[str, Any] = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def expected_text(body: dict[str, Any], chunk_count: int) -> str:
    """The content the mock generates for ``body`` (the proxy always asks it for a stream: same text)."""
    key = orjson.dumps(
        {k: v for k, v in body.items() if k not in ("stream", "stream_options")}, option=orjson.OPT_SORT_KEYS
    )
    return _expected(key, chunk_count)


@functools.lru_cache(maxsize=4096)
def _expected(canonical: bytes, chunk_count: int) -> str:
    forwarded = {**orjson.loads(canonical), "stream": True, "stream_options": {"include_usage": True}}
    outputs = generate(parse_chat(forwarded), chunk_count=chunk_count, reasoning=False, max_model_len=4096)
    return "".join(outputs[0].content)


@dataclass
class Verdict:
    outcome: str  # "answer", "error", "lost", "corrupt" or "dirty"
    status: int | None = None
    cache: str | None = None  # the X-Cache header
    detail: str = ""
    key: str | None = None  # the X-Cache-Key header


@dataclass
class Tally:
    """Verdicts of many requests, in the ledger's failure kinds."""

    requests: int = 0
    answers: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    answered_keys: set[str] = field(default_factory=set)  # X-Cache-Key of every complete answer
    lost_answers: int = 0
    corrupt_served: int = 0
    dirty_errors: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, verdict: Verdict) -> Verdict:
        self.requests += 1
        if verdict.cache:
            self.cache[verdict.cache] = self.cache.get(verdict.cache, 0) + 1
        if verdict.outcome == "answer":
            self.answers += 1
            if verdict.key:
                self.answered_keys.add(verdict.key)
        elif verdict.outcome == "error":
            assert verdict.status is not None
            self.errors[verdict.status] = self.errors.get(verdict.status, 0) + 1
        else:
            self.fail(verdict.outcome, verdict.detail)
        return verdict

    def fail(self, outcome: str, detail: str) -> None:
        name = {"lost": "lost_answers", "corrupt": "corrupt_served", "dirty": "dirty_errors"}[outcome]
        setattr(self, name, getattr(self, name) + 1)
        if len(self.notes) < MAX_NOTES:
            self.notes.append(f"{outcome}: {detail}"[:300])

    def failures(self) -> dict[str, int]:
        return {
            "lost_answers": self.lost_answers,
            "corrupt_served": self.corrupt_served,
            "dirty_errors": self.dirty_errors,
        }

    def summary(self) -> str:
        return (
            f"{self.requests} requests: {self.answers} answers, errors {dict(sorted(self.errors.items()))}, "
            f"x-cache {dict(sorted(self.cache.items()))}, lost {self.lost_answers}, "
            f"corrupt {self.corrupt_served}, dirty {self.dirty_errors}"
        )


def error_problem(status: int, text: str, allowed: frozenset[int]) -> str | None:
    """Why an error answer is not a clean one, or None when it is."""
    if "Traceback" in text:
        return f"{status} with a traceback"
    if status not in allowed:
        return f"unexpected status {status}: {text[:120]}"
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} body is not OpenAI-shaped: {text[:120]}"
    if not isinstance(error, dict) or set(error) != ERROR_FIELDS or not error.get("message"):
        return f"{status} error object is not OpenAI-shaped: {text[:120]}"
    return None


async def ask(
    http: httpx.AsyncClient,
    body: dict[str, Any],
    *,
    chunk_count: int,
    deadline: float,
    allowed: frozenset[int] = HONEST_5XX,
) -> Verdict:
    """Send ``body`` to the proxy and judge what comes back within ``deadline`` seconds (else: lost, a hang)."""

    async def exchange() -> tuple[httpx.Response, bytes]:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            return response, await response.aread()

    try:
        response, raw = await asyncio.wait_for(exchange(), deadline)
    except asyncio.TimeoutError:
        return Verdict("lost", detail=f"no answer within {deadline:g}s (a hang)")
    except httpx.HTTPError as exc:
        return Verdict("lost", detail=f"{type(exc).__name__}: {exc}")
    return judge(
        body,
        response.status_code,
        raw.decode("utf-8", "replace"),
        response.headers.get("x-cache"),
        response.headers.get("x-cache-key"),
        chunk_count=chunk_count,
        allowed=allowed,
    )


def judge(
    body: dict[str, Any],
    status: int,
    text: str,
    cache: str | None,
    key: str | None,
    *,
    chunk_count: int,
    allowed: frozenset[int] = HONEST_5XX,
) -> Verdict:
    """What an answer to ``body`` with this status and body text is (any HTTP client can use it)."""
    want = expected_text(body, chunk_count)
    if body.get("stream") and status == 200:
        verdict = judge_stream(text, want, allowed, cache)
    else:
        verdict = judge_plain(status, text, want, allowed, cache)
    verdict.key = key
    return verdict


def judge_plain(status: int, text: str, want: str, allowed: frozenset[int], cache: str | None) -> Verdict:
    """A plain answer: the complete one for the request, or a clean error."""
    if status != 200:
        problem = error_problem(status, text, allowed)
        return Verdict("dirty" if problem else "error", status, cache, problem or "")
    try:
        choice = json.loads(text)["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
    except (ValueError, KeyError, IndexError, TypeError):
        return Verdict("corrupt", 200, cache, f"unreadable answer: {text[:120]}")
    if content != want or finish not in ("stop", "length"):
        return Verdict("corrupt", 200, cache, f"{cache}: got {content!r} ({finish}), want {want!r}")
    return Verdict("answer", 200, cache)


def judge_stream(text: str, want: str, allowed: frozenset[int], cache: str | None) -> Verdict:
    """A 200 stream: complete and right, or ended by a clean error event after a correct prefix."""
    if "Traceback" in text:
        return Verdict("dirty", 200, cache, "a traceback in the stream")
    events: list[str] = []
    for block in text.split("\n\n"):
        if block.startswith(":") or not block.strip():
            continue  # keep-alive comments
        if not block.startswith("data: ") or "\n" in block:
            return Verdict("corrupt", 200, cache, f"malformed event sent to the client: {block[:120]!r}")
        events.append(block[len("data: ") :])
    if not events or events[-1] != "[DONE]" or not text.endswith("\n\n"):
        return Verdict("lost", 200, cache, f"stream ended without [DONE] after {len(events)} events")
    got: list[str] = []
    finish = None
    for number, data in enumerate(events[:-1]):
        try:
            chunk = json.loads(data)
        except ValueError:
            return Verdict("corrupt", 200, cache, f"invalid JSON event sent to the client: {data[:120]!r}")
        if "error" in chunk:
            if number != len(events) - 2:
                return Verdict("dirty", 200, cache, "an error event that is not the last before [DONE]")
            problem = error_problem(int(chunk["error"].get("code") or 0), data, allowed)
            if problem:
                return Verdict("dirty", 200, cache, f"error event: {problem}")
            if not want.startswith("".join(got)):
                return Verdict(
                    "corrupt", 200, cache, f"chunks before the error {''.join(got)!r} are not a prefix of {want!r}"
                )
            return Verdict("error", int(chunk["error"]["code"]), cache)
        for choice in chunk.get("choices") or ():
            got.append(choice.get("delta", {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
    if "".join(got) != want or finish not in ("stop", "length"):
        return Verdict("corrupt", 200, cache, f"{cache}: streamed {''.join(got)!r} ({finish}), want {want!r}")
    return Verdict("answer", 200, cache)


async def ask_all(
    http: httpx.AsyncClient,
    bodies: list[dict[str, Any]],
    tally: Tally,
    *,
    chunk_count: int,
    deadline: float,
    allowed: frozenset[int] = HONEST_5XX,
    concurrency: int = 8,
) -> list[Verdict]:
    """Ask every body, ``concurrency`` at a time (identical bodies among them may coalesce)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> Verdict:
        async with gate:
            return tally.add(await ask(http, body, chunk_count=chunk_count, deadline=deadline, allowed=allowed))

    return list(await asyncio.gather(*(one(b) for b in bodies)))


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.json")) if cache_dir.is_dir() else []


async def check_cache_dir(
    http: httpx.AsyncClient, cache_dir: Path, tally: Tally, *, chunk_count: int, deadline: float, reask: bool = True
) -> int:
    """Every entry on disk parses, is the complete answer to the request it records, and (``reask``) a HIT,
    plain and streamed, serves exactly that answer. Problems count as corrupt_served in ``tally``; returns
    the number of entries."""
    files = cache_files(cache_dir)
    for path in files:
        try:
            document = orjson.loads(path.read_bytes())
            request, response = document["request"], document["response"]
            stored = response["choices"][0]["message"]["content"]
            finish = response["choices"][0]["finish_reason"]
            chunks = "".join(
                orjson.loads(c)["choices"][0]["delta"].get("content") or ""
                for c in document["chunks"]
                if orjson.loads(c).get("choices")
            )
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            tally.fail("corrupt", f"cache file {path.name[:16]} is not a whole entry ({type(exc).__name__})")
            continue
        if path.name != f"{document.get('key')}.json":
            tally.fail("corrupt", f"cache file {path.name[:16]} holds key {str(document.get('key'))[:16]}")
            continue
        want = expected_text(request, chunk_count)
        if stored != want or chunks != want or finish not in ("stop", "length"):
            tally.fail("corrupt", f"cache file {path.name[:16]} holds {stored!r} ({finish}), want {want!r}")
            continue
        for stream in (False, True) if reask else ():
            body = {**request, **({"stream": True, "stream_options": {"include_usage": True}} if stream else {})}
            verdict = await ask(http, body, chunk_count=chunk_count, deadline=deadline)
            if verdict.outcome != "answer" or verdict.cache != "HIT":
                tally.fail(
                    "corrupt" if verdict.outcome in ("answer", "corrupt") else verdict.outcome,
                    f"re-asking a stored entry: {verdict.outcome} {verdict.cache} {verdict.detail}",
                )
    return len(files)
