"""Pre-filled cache directories in the proxy's on-disk format (see ``llmpod/proxy/cache.py``).

Entry ``i`` answers ``request_body(i)``: a chat request for model ``m`` without stream fields, which is
exactly what the proxy forwards for it (the mock serves ``m``, so the alias resolves to itself, and the
prompt is short enough that ``max_tokens`` is never lowered). Its file is ``<cache_key>.json``, keyed as the
mock's answer (the benchmark's upstream is the mock, which marks itself), so a client sending ``request_body(i)``
gets a HIT. Sizes are 2-20 KB, drawn from a seeded RNG.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from llmpod.proxy.cache import FORMAT_VERSION, cache_key
from llmpod.server_kind import MOCK as KIND

ENDPOINT = "chat.completions"
MODEL = "m"
MIN_SIZE = 2 * 1024
MAX_SIZE = 20 * 1024
SYSTEM = (
    "You are an expert programming assistant. Answer with working code and a short explanation; "
    "prefer the standard library and keep functions small."
)
WORDS = (
    "def",
    "return",
    "self",
    "import",
    "class",
    "value",
    "items",
    "for",
    "in",
    "range",
    "len",
    "async",
    "await",
    "yield",
    "list",
    "dict",
    "None",
    "True",
    "parse",
    "config",
    "request",
    "response",
    "cache",
    "path",
    "open",
    "with",
    "as",
    "try",
    "except",
    "raise",
    "error",
    "print",
    "format",
    "json",
    "load",
    "write",
    "read",
    "key",
    "index",
    "data",
    "result",
    "count",
    "while",
    "break",
    "lambda",
    "sorted",
    "filter",
    "map",
    "token",
    "stream",
)
TOKENS = (*(f" {w}" for w in WORDS), "(", ")", ":", "\n    ", ",", ".", " =", " ==", "[", "]")


def request_body(i: int) -> dict[str, Any]:
    """The request entry ``i`` answers (as sent by a client and as forwarded by the proxy)."""
    n = 6 + (i * 7919) % 60
    question = " ".join(WORDS[(i * 31 + j * 17) % len(WORDS)] for j in range(n))
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"[bench entry {i}] How do I {question}?"},
        ],
        "max_tokens": 512,
        "temperature": 0,
    }


def entry_key(i: int) -> str:
    return cache_key(ENDPOINT, request_body(i), KIND)


@dataclass
class FilledDir:
    path: Path
    count: int
    sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        sizes = self.sizes
        return {
            "entries": self.count,
            "bytes": sum(sizes),
            "min_size": min(sizes, default=0),
            "max_size": max(sizes, default=0),
            "mean_size": round(sum(sizes) / len(sizes)) if sizes else 0,
            "seconds": round(self.seconds, 2),
        }


class _Shapes:
    """Chunk and document templates, with the byte cost of each token measured once."""

    def __init__(self) -> None:
        self.head = '{"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":"m","choices":'
        # calibrate: bytes per token (a chunk, escaped in the document, and the token in the answer) and
        # the fixed rest, from two documents of known token counts
        self.per_token, self.fixed = 1.0, 0.0
        small = len(build_document(0, 0, self, 1_800_000_000, tokens=10)[1])
        large = len(build_document(0, 0, self, 1_800_000_000, tokens=410)[1])
        self.per_token = (large - small) / 400
        self.fixed = small - 10 * self.per_token

    def chunk(self, cid: str, created: int, token: str, finish: bool = False) -> str:
        tail = '"stop","stop_reason":null' if finish else "null"
        return (
            self.head % (cid, created)
            + '[{"index":0,"delta":{"content":'
            + orjson.dumps(token).decode()
            + '},"logprobs":null,"finish_reason":'
            + tail
            + "}]}"
        )


def build_document(i: int, size: int, shapes: _Shapes, created: int, tokens: int | None = None) -> tuple[str, bytes]:
    """Entry ``i`` as file bytes, about ``size`` bytes long (or with exactly ``tokens`` tokens)."""
    body = request_body(i)
    key = cache_key(ENDPOINT, body, KIND)
    cid = f"{i:016x}"
    n = tokens if tokens is not None else max(1, round((size - shapes.fixed) / shapes.per_token))
    words = [TOKENS[(i + j * 7) % len(TOKENS)] for j in range(n)]
    prompt_tokens = 40 + len(body["messages"][1]["content"]) // 4
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
    role = (
        shapes.head % (cid, created)
        + '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}'
    )
    chunks = [role] + [shapes.chunk(cid, created, t, finish=(j == n - 1)) for j, t in enumerate(words)]
    usage_chunk = shapes.head % (cid, created) + '[],"usage":' + orjson.dumps(usage).decode() + "}"
    document = {
        "format": FORMAT_VERSION,
        "key": key,
        "endpoint": ENDPOINT,
        "model": MODEL,
        "created": float(created),
        "preview": f"[bench entry {i}] How do I",
        "completion_tokens": n,
        "request": body,
        "response": {
            "id": f"chatcmpl-{cid}",
            "object": "chat.completion",
            "created": created,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(words), "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
            "usage": usage,
        },
        "chunks": chunks,
        "usage_chunk": usage_chunk,
        "kind": KIND,
    }
    return key, orjson.dumps(document)


def fill(directory: Path, count: int, seed: int = 1234) -> FilledDir:
    """Write entries 0..count-1 into ``directory`` (created)."""
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shapes = _Shapes()
    created = int(time.time())
    result = FilledDir(directory, count)
    for i in range(count):
        key, data = build_document(i, rng.randint(MIN_SIZE, MAX_SIZE), shapes, created)
        with open(directory / f"{key}.json", "wb") as handle:
            handle.write(data)
        result.sizes.append(len(data))
    result.seconds = time.perf_counter() - started
    return result


def link_subset(source: FilledDir, directory: Path, count: int) -> FilledDir:
    """A directory holding entries 0..count-1 of ``source`` as hard links (no copy; eviction in one
    directory unlinks only its own names)."""
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = f"{entry_key(i)}.json"
        os.link(source.path / name, directory / name)
    return FilledDir(directory, count, source.sizes[:count], time.perf_counter() - started)
