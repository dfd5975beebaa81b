"""The on-disk response cache: keys, the stored file, LRU limits, restarts, and broken disks."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import llmpod.proxy.cache
from llmpod.proxy.cache import CachedAnswer, CacheEntry, ResponseCache, cache_key
from llmpod.server_kind import VLLM as KIND
from tests.support.helpers import HeldScan

CHAT = "chat.completions"
HEX64 = re.compile(r"[0-9a-f]{64}")

BASE_BODY: dict[str, Any] = {
    "model": "qwen-7b",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two numbers",
                "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
            },
        }
    ],
    "temperature": 0.7,
    "max_tokens": 64,
}


# --------------------------------------------------------------------------------------------- helpers
def key_for(question: str) -> str:
    return cache_key(CHAT, {"model": "qwen-7b", "messages": [{"role": "user", "content": question}]}, KIND)


def answer_document(text: str, *, usage: bool = True) -> dict[str, Any]:
    """A document shaped like the one the proxy stores after a streamed upstream answer."""
    response = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "qwen-7b",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"qwen-7b"'
    chunks = [
        head + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        head + ',"choices":[{"index":0,"delta":{"content":' + orjson.dumps(text).decode() + "}}]}",
        head + ',"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    ]
    usage_chunk = head + ',"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'
    return {
        "endpoint": CHAT,
        "model": "qwen-7b",
        "created": 1700000000.5,
        "preview": text[:20],
        "completion_tokens": 2,
        "request": {"model": "qwen-7b", "messages": [{"role": "user", "content": "q"}]},
        "response": response,
        "chunks": chunks,
        "usage_chunk": usage_chunk if usage else None,
        "kind": KIND,
        "generation_seconds": 1.25,
    }


def entry_files(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())


def stored_size(key: str, document: dict[str, Any]) -> int:
    """The size of the file ``put`` writes for ``document``."""
    return len(orjson.dumps({"format": llmpod.proxy.cache.FORMAT_VERSION, "key": key, **document}))


def set_last_use(directory: Path, key: str, when: float) -> None:
    os.utime(directory / f"{key}.json", (when, when))


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def open_cache(cache_dir: Path) -> Callable[..., ResponseCache]:
    """Start a cache on ``cache_dir`` the way the proxy does (construct, then ``load``)."""

    def start(max_entries: int = 100, max_bytes: int = 10 * 1024 * 1024) -> ResponseCache:
        cache = ResponseCache(cache_dir, max_entries=max_entries, max_bytes=max_bytes)
        cache.load()
        return cache

    return start


@pytest.fixture
def cache(open_cache: Callable[..., ResponseCache]) -> ResponseCache:
    return open_cache()


class FakeMonotonic:
    """Stands in for the ``time`` module inside ``llmpod.proxy.cache``; ``monotonic()`` can be moved forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def fake_monotonic(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    clock = FakeMonotonic()
    monkeypatch.setattr(llmpod.proxy.cache, "time", clock)
    return clock


class FullDisk:
    """Makes every cache write fail with ``error`` while ``full`` is true; records attempted keys."""

    def __init__(self, original: Callable[[ResponseCache, str, bytes], None]) -> None:
        self.original = original
        self.full = True
        self.error = errno.ENOSPC
        self.attempts: list[str] = []

    def write(self, cache: ResponseCache, key: str, data: bytes) -> None:
        self.attempts.append(key)
        if self.full:
            raise OSError(self.error, os.strerror(self.error))
        self.original(cache, key, data)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> FullDisk:
    disk = FullDisk(ResponseCache._write_atomically)

    def write_atomically(self: ResponseCache, key: str, data: bytes) -> None:
        disk.write(self, key, data)

    monkeypatch.setattr(ResponseCache, "_write_atomically", write_atomically)
    return disk


# --------------------------------------------------------------------------------------------- cache_key
def test_key_is_64_lowercase_hex() -> None:
    assert HEX64.fullmatch(cache_key(CHAT, BASE_BODY, KIND))


def test_key_ignores_key_order_at_every_depth() -> None:
    def reversed_keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {name: reversed_keys(value[name]) for name in reversed(list(value))}
        if isinstance(value, list):
            return [reversed_keys(item) for item in value]
        return value

    shuffled = reversed_keys(BASE_BODY)
    # the reordering really happened, inside messages and tools too
    assert list(shuffled) != list(BASE_BODY)
    assert list(shuffled["messages"][0]) != list(BASE_BODY["messages"][0])
    assert list(shuffled["tools"][0]["function"]["parameters"]) != list(BASE_BODY["tools"][0]["function"]["parameters"])
    assert cache_key(CHAT, shuffled, KIND) == cache_key(CHAT, BASE_BODY, KIND)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", True),
        ("stream_options", {"include_usage": True}),
        ("user", "alice"),
        ("cache", {"no-store": True}),
        ("metadata", {"trace": "abc"}),
        ("store", True),
        ("request_id", "req-123"),
    ],
)
def test_transport_and_label_fields_do_not_change_the_key(field: str, value: Any) -> None:
    assert cache_key(CHAT, {**BASE_BODY, field: value}, KIND) == cache_key(CHAT, BASE_BODY, KIND)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", [{"role": "user", "content": "What is 3+3?"}]),
        ("tools", []),
        ("tool_choice", "required"),
        ("temperature", 0.2),
        ("top_p", 0.9),
        ("max_tokens", 65),
        ("seed", 42),
        ("response_format", {"type": "json_object"}),
        ("stop", ["\n"]),
        ("model", "llama-8b"),
        ("n", 2),
    ],
)
def test_answer_changing_fields_change_the_key(field: str, value: Any) -> None:
    assert cache_key(CHAT, {**BASE_BODY, field: value}, KIND) != cache_key(CHAT, BASE_BODY, KIND)


def test_chat_and_text_completion_endpoints_never_share_a_key() -> None:
    assert cache_key("chat.completions", BASE_BODY, KIND) != cache_key("completions", BASE_BODY, KIND)


def test_the_mock_and_a_real_vllm_never_share_a_key() -> None:
    # they serve the same model id: without the kind, --local's answers were served for the real pod
    assert cache_key(CHAT, BASE_BODY, "mock") != cache_key(CHAT, BASE_BODY, "vllm")


@pytest.mark.parametrize(("as_int", "as_float"), [(0, 0.0), (1, 1.0), (2, 2.0)])
def test_integral_floats_and_ints_share_a_key(as_int: int, as_float: float) -> None:
    assert cache_key(CHAT, {**BASE_BODY, "temperature": as_int}, KIND) == cache_key(
        CHAT, {**BASE_BODY, "temperature": as_float}, KIND
    )


@pytest.mark.parametrize("huge", [1e20, 1e300, -1e20])
def test_key_for_a_huge_integral_number_does_not_crash(huge: float) -> None:
    # ``{"max_tokens": 100000000000000000000}`` parses to the float 1e20; the proxy must still compute a key
    # (and let vLLM reject the value) instead of failing the request with an internal error.
    assert HEX64.fullmatch(cache_key(CHAT, {**BASE_BODY, "max_tokens": huge}, KIND))


# --------------------------------------------------------------------------------------------- round trip
async def test_put_then_get_serves_the_stored_answer(cache: ResponseCache) -> None:
    key = key_for("hello")
    document = answer_document("Hello there")

    assert cache.put(key, CacheEntry(**document)) is True
    answer = cache.get(key)

    assert isinstance(answer, CachedAnswer)
    assert answer.key == key
    assert answer.response == document["response"]
    assert answer.chunks == document["chunks"]
    assert answer.usage_chunk == document["usage_chunk"]
    assert answer.completion_tokens == 2
    stored = cache.read_document(key)
    assert stored is not None
    for field in (
        "endpoint",
        "model",
        "created",
        "preview",
        "completion_tokens",
        "request",
        "response",
        "chunks",
        "usage_chunk",
    ):
        assert stored[field] == document[field], field
    assert stored["key"] == key


async def test_json_bytes_is_the_stored_response(cache: ResponseCache) -> None:
    key = key_for("json")
    document = answer_document("plain answer")
    cache.put(key, CacheEntry(**document))

    answer = cache.get(key)

    assert answer is not None
    assert orjson.loads(answer.json_bytes()) == document["response"]


@pytest.mark.parametrize("include_usage", [True, False])
async def test_sse_bytes_replays_the_stream(cache: ResponseCache, include_usage: bool) -> None:
    key = key_for("stream")
    document = answer_document("streamed")
    cache.put(key, CacheEntry(**document))

    answer = cache.get(key)

    assert answer is not None
    expected = "".join(f"data: {chunk}\n\n" for chunk in document["chunks"])
    if include_usage:
        expected += f"data: {document['usage_chunk']}\n\n"
    expected += "data: [DONE]\n\n"
    assert answer.sse_bytes(include_usage) == expected.encode()


async def test_sse_bytes_without_a_stored_usage_chunk(cache: ResponseCache) -> None:
    key = key_for("no usage")
    document = answer_document("x", usage=False)
    cache.put(key, CacheEntry(**document))

    answer = cache.get(key)

    assert answer is not None
    expected = "".join(f"data: {chunk}\n\n" for chunk in document["chunks"]) + "data: [DONE]\n\n"
    assert answer.sse_bytes(True) == expected.encode()


def test_get_of_an_unknown_key_is_a_miss(cache: ResponseCache) -> None:
    assert cache.get(key_for("never stored")) is None


async def test_put_replaces_an_existing_answer(cache: ResponseCache, cache_dir: Path) -> None:
    key = key_for("again")
    cache.put(key, CacheEntry(**answer_document("first")))
    cache.put(key, CacheEntry(**answer_document("second, longer answer")))

    answer = cache.get(key)

    assert answer is not None
    assert answer.response["choices"][0]["message"]["content"] == "second, longer answer"
    assert len(cache) == 1
    assert cache.total_bytes == disk_bytes(cache_dir)


async def test_a_served_answer_replaced_by_a_new_one_is_served_new(cache: ResponseCache) -> None:
    key = key_for("replaced while in memory")
    cache.put(key, CacheEntry(**answer_document("old")))
    assert cache.get(key) is not None  # served once: now kept parsed in memory

    cache.put(key, CacheEntry(**answer_document("new")))
    answer = cache.get(key)

    assert answer is not None and answer.response["choices"][0]["message"]["content"] == "new"


async def test_a_served_answer_whose_file_was_deleted_is_no_longer_served(
    cache: ResponseCache, cache_dir: Path
) -> None:
    key = key_for("deleted behind our back")
    cache.put(key, CacheEntry(**answer_document("cached")))
    assert cache.get(key) is not None

    (cache_dir / f"{key}.json").unlink()  # the user clears the cache with rm while the proxy runs

    assert cache.get(key) is None
    assert key not in cache


async def test_answers_served_again_come_from_memory_yet_still_count_their_use(
    cache: ResponseCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = key_for("popular")
    cache.put(key, CacheEntry(**answer_document("again and again")))
    assert cache.get(key) is not None
    set_last_use(cache_dir, key, 1_000_000)

    reads: list[str] = []
    monkeypatch.setattr(ResponseCache, "_read", lambda self, k: reads.append(k))
    answer = cache.get(key)

    assert answer is not None and answer.response["choices"][0]["message"]["content"] == "again and again"
    assert reads == []  # not read from disk again
    assert (cache_dir / f"{key}.json").stat().st_mtime > 1_000_000  # the use still reaches the file (LRU)


async def test_memory_for_served_answers_is_bounded(
    cache_dir: Path, open_cache: Callable[..., ResponseCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llmpod.proxy.cache, "HOT_BYTES", 32 * 1024)
    cache = open_cache()
    keys = [key_for(f"bounded {i}") for i in range(40)]
    for key in keys:
        cache.put(key, CacheEntry(**answer_document("x" * 100)))  # ~1.3 KB each: 40 need ~52 KB
        assert cache.get(key) is not None

    assert 0 < cache._hot_bytes <= 32 * 1024
    assert set(cache._hot) < set(keys)  # the oldest served left memory; they are still on disk
    assert all(cache.get(key) is not None for key in keys)


# --------------------------------------------------------------------------------------------- files on disk
async def test_one_file_per_entry_named_by_key_and_no_temp_files(cache: ResponseCache, cache_dir: Path) -> None:
    keys = [key_for(f"q{i}") for i in range(3)]
    for key in keys:
        cache.put(key, CacheEntry(**answer_document(key[:8])))

    assert entry_files(cache_dir) == {f"{key}.json" for key in keys}
    for key in keys:
        assert orjson.loads((cache_dir / f"{key}.json").read_bytes())["key"] == key


def test_load_removes_a_temp_file_left_by_a_crash_and_never_serves_it(
    cache_dir: Path, open_cache: Callable[..., ResponseCache]
) -> None:
    key = key_for("crashed")
    cache_dir.mkdir(parents=True)
    leftover = cache_dir / f".tmp-{key}-1234-5678"
    leftover.write_bytes(orjson.dumps({"format": 1, "key": key, **answer_document("half")})[:40])

    cache = open_cache()

    assert not leftover.exists()
    assert entry_files(cache_dir) == set()
    assert cache.get(key) is None
    assert len(cache) == 0


async def test_a_write_that_fails_midway_keeps_the_previous_answer_and_leaves_no_temp_file(
    cache: ResponseCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = key_for("atomic")
    cache.put(key, CacheEntry(**answer_document("old answer")))
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).parent == cache_dir:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(llmpod.proxy.cache.os, "replace", failing_replace)

    assert cache.put(key, CacheEntry(**answer_document("new answer"))) is False

    assert entry_files(cache_dir) == {f"{key}.json"}
    answer = cache.get(key)
    assert answer is not None
    assert answer.response["choices"][0]["message"]["content"] == "old answer"
    assert cache.store_errors == 1
    assert cache.storing  # an I/O error on one entry does not stop storing


# --------------------------------------------------------------------------------------------- eviction
async def test_count_limit_evicts_least_recently_used(
    open_cache: Callable[..., ResponseCache], cache_dir: Path
) -> None:
    cache = open_cache(max_entries=3)
    a, b, c, d = (key_for(name) for name in "abcd")
    for key in (a, b, c):
        cache.put(key, CacheEntry(**answer_document(key[:8])))

    assert cache.get(a) is not None  # a is now the most recently used; b is the oldest
    cache.put(d, CacheEntry(**answer_document(d[:8])))

    assert b not in cache
    assert cache.get(b) is None
    assert all(cache.get(key) is not None for key in (a, c, d))
    assert entry_files(cache_dir) == {f"{key}.json" for key in (a, c, d)}
    assert cache.evictions == 1
    assert cache.total_bytes == disk_bytes(cache_dir)


async def test_byte_limit_evicts_least_recently_used(open_cache: Callable[..., ResponseCache], cache_dir: Path) -> None:
    a, b, c = (key_for(name) for name in "abc")
    documents = {key: answer_document("same length") for key in (a, b, c)}
    size = stored_size(a, documents[a])
    assert {stored_size(key, doc) for key, doc in documents.items()} == {size}
    cache = open_cache(max_bytes=2 * size + size // 2)  # room for two entries

    cache.put(a, CacheEntry(**documents[a]))
    cache.put(b, CacheEntry(**documents[b]))
    assert cache.get(a) is not None  # refresh a: b becomes the oldest
    cache.put(c, CacheEntry(**documents[c]))

    assert entry_files(cache_dir) == {f"{a}.json", f"{c}.json"}
    assert cache.get(b) is None
    assert cache.evictions == 1
    assert cache.total_bytes == disk_bytes(cache_dir) == 2 * size


async def test_total_bytes_tracks_the_files_on_disk(cache: ResponseCache, cache_dir: Path) -> None:
    keys = [key_for(f"size {i}") for i in range(4)]
    for i, key in enumerate(keys):
        cache.put(key, CacheEntry(**answer_document("x" * (10 * (i + 1)))))
    assert cache.total_bytes == disk_bytes(cache_dir)

    cache.delete(keys[0])
    assert cache.total_bytes == disk_bytes(cache_dir)


async def test_an_answer_larger_than_the_byte_budget_is_kept_alone(
    open_cache: Callable[..., ResponseCache], cache_dir: Path
) -> None:
    cache = open_cache(max_bytes=100)  # every answer is bigger than this
    a, b = key_for("big a"), key_for("big b")

    assert cache.put(a, CacheEntry(**answer_document("a")))
    assert cache.get(a) is not None
    assert cache.put(b, CacheEntry(**answer_document("b")))

    assert entry_files(cache_dir) == {f"{b}.json"}
    assert cache.get(b) is not None


# --------------------------------------------------------------------------------------------- restart
async def test_a_restarted_cache_serves_the_same_answers(
    open_cache: Callable[..., ResponseCache], cache_dir: Path
) -> None:
    first = open_cache()
    keys = [key_for(f"persist {i}") for i in range(3)]
    for key in keys:
        first.put(key, CacheEntry(**answer_document(f"answer {key[:6]}")))

    second = open_cache()

    assert len(second) == 3
    assert second.total_bytes == disk_bytes(cache_dir)
    for key in keys:
        answer = second.get(key)
        assert answer is not None
        assert answer.response == answer_document(f"answer {key[:6]}")["response"]


async def test_lru_order_survives_a_restart(open_cache: Callable[..., ResponseCache], cache_dir: Path) -> None:
    first = open_cache()
    a, b, c, d = (key_for(name) for name in "abcd")
    for key in (a, b, c):
        first.put(key, CacheEntry(**answer_document(key[:8])))
    # last use recorded on disk: b oldest, then c, then a (not the insertion order)
    set_last_use(cache_dir, b, 1_000_000)
    set_last_use(cache_dir, c, 2_000_000)
    set_last_use(cache_dir, a, 3_000_000)

    second = open_cache(max_entries=2)  # load() enforces the smaller limit

    assert entry_files(cache_dir) == {f"{a}.json", f"{c}.json"}
    assert len(second) == 2
    assert second.evictions == 1
    second.put(d, CacheEntry(**answer_document(d[:8])))
    assert entry_files(cache_dir) == {f"{a}.json", f"{d}.json"}


async def test_a_hit_before_a_restart_counts_as_recent_use(
    open_cache: Callable[..., ResponseCache], cache_dir: Path
) -> None:
    first = open_cache()
    a, b = key_for("a"), key_for("b")
    first.put(a, CacheEntry(**answer_document("a")))
    first.put(b, CacheEntry(**answer_document("b")))
    set_last_use(cache_dir, a, 1_000_000)
    set_last_use(cache_dir, b, 2_000_000)

    assert first.get(a) is not None  # a is now the most recently used

    second = open_cache(max_entries=1)
    assert a in second
    assert b not in second
    assert entry_files(cache_dir) == {f"{a}.json"}


async def test_load_enforces_a_smaller_byte_limit(open_cache: Callable[..., ResponseCache], cache_dir: Path) -> None:
    first = open_cache()
    keys = [key_for(f"bytes {i}") for i in range(4)]
    for i, key in enumerate(keys):
        first.put(key, CacheEntry(**answer_document("same length")))
        set_last_use(cache_dir, key, 1_000_000 + i)
    size = stored_size(keys[0], answer_document("same length"))

    second = open_cache(max_bytes=2 * size)

    assert entry_files(cache_dir) == {f"{keys[2]}.json", f"{keys[3]}.json"}
    assert second.total_bytes == disk_bytes(cache_dir) == 2 * size
    assert second.evictions == 2


# --------------------------------------------------------------------------------------------- corrupt files
def corrupt_contents(key: str) -> dict[str, bytes]:
    valid = {"format": 1, "key": key, **answer_document("fine")}
    return {
        "invalid JSON": b'{"format": 1, "key": "' + key.encode() + b'", "response": {',
        "key does not match the name": orjson.dumps({**valid, "key": key_for("someone else")}),
        "missing response": orjson.dumps({k: v for k, v in valid.items() if k != "response"}),
        "missing chunks": orjson.dumps({k: v for k, v in valid.items() if k != "chunks"}),
        "not an object": orjson.dumps([valid]),
        "empty file": b"",
    }


@pytest.mark.parametrize("kind", list(corrupt_contents("0" * 64)))
async def test_a_corrupt_file_is_a_miss_and_is_deleted(
    open_cache: Callable[..., ResponseCache], cache_dir: Path, kind: str
) -> None:
    key = key_for("corrupt")
    cache_dir.mkdir(parents=True)
    path = cache_dir / f"{key}.json"
    path.write_bytes(corrupt_contents(key)[kind])
    cache = open_cache()
    assert key in cache  # load() only stats files

    assert cache.get(key) is None

    assert not path.exists()
    assert key not in cache
    assert cache.corrupt_discarded == 1
    assert cache.total_bytes == 0
    assert cache.put(key, CacheEntry(**answer_document("repaired"))) is True
    answer = cache.get(key)
    assert answer is not None
    assert answer.response["choices"][0]["message"]["content"] == "repaired"


@pytest.mark.parametrize(
    "name",
    [
        "notes.txt",
        "README",
        "0" * 63 + ".json",
        "0" * 65 + ".json",
        "A" * 64 + ".json",
        "g" * 64 + ".json",
        "0" * 64 + ".json.bak",
        "0" * 64,
    ],
)
def test_load_ignores_files_that_are_not_entries(
    open_cache: Callable[..., ResponseCache], cache_dir: Path, name: str
) -> None:
    cache_dir.mkdir(parents=True)
    (cache_dir / name).write_bytes(b"{}")

    cache = open_cache(max_entries=1, max_bytes=1024)

    assert len(cache) == 0
    assert cache.total_bytes == 0
    assert (cache_dir / name).exists()  # not ours: left alone


async def test_a_file_deleted_behind_the_caches_back_is_a_plain_miss(cache: ResponseCache, cache_dir: Path) -> None:
    key = key_for("vanishing")
    cache.put(key, CacheEntry(**answer_document("gone soon")))
    (cache_dir / f"{key}.json").unlink()

    assert cache.get(key) is None

    assert key not in cache
    assert len(cache) == 0
    assert cache.total_bytes == 0
    assert cache.corrupt_discarded == 0


# --------------------------------------------------------------------------------------------- broken disk
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["ENOSPC", "EROFS", "EACCES"])
async def test_a_full_or_read_only_disk_stops_storing_but_keeps_serving(
    cache: ResponseCache, cache_dir: Path, full_disk: FullDisk, fake_monotonic: FakeMonotonic, error: int
) -> None:
    stored, refused, later, after = (key_for(name) for name in ("stored", "refused", "later", "after"))
    full_disk.full = False
    assert cache.put(stored, CacheEntry(**answer_document("kept")))
    full_disk.full = True
    full_disk.error = error

    assert cache.put(refused, CacheEntry(**answer_document("no room"))) is False

    assert cache.store_disabled_reason is not None
    assert os.strerror(error) in cache.store_disabled_reason
    assert cache.storing is False
    assert refused not in cache
    answer = cache.get(stored)
    assert answer is not None
    assert answer.response["choices"][0]["message"]["content"] == "kept"
    # within the pause, puts give up without touching the disk again
    assert cache.put(later, CacheEntry(**answer_document("still no room"))) is False
    assert full_disk.attempts == [stored, refused]

    full_disk.full = False
    fake_monotonic.advance(llmpod.proxy.cache.RETRY_STORE_AFTER + 1)
    assert cache.storing is True
    assert cache.put(after, CacheEntry(**answer_document("room again"))) is True

    assert cache.store_disabled_reason is None
    assert cache.get(after) is not None
    assert entry_files(cache_dir) == {f"{stored}.json", f"{after}.json"}


@pytest.mark.parametrize("start", ["load", "load_behind"])
async def test_a_cache_directory_that_cannot_be_made_stops_storing_and_serves_nothing(
    tmp_path: Path, start: str
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    cache = ResponseCache(tmp_path / "a-file" / "cache", max_entries=10, max_bytes=10**6)
    if start == "load":
        cache.load()
    else:
        await cache.load_behind()

    assert cache.loading is False
    assert cache.store_disabled_reason is not None and "cannot create" in cache.store_disabled_reason
    assert len(cache) == 0 and cache.get(key_for("anything")) is None


async def test_a_full_disk_that_is_still_full_after_the_pause_stays_disabled(
    cache: ResponseCache, full_disk: FullDisk, fake_monotonic: FakeMonotonic
) -> None:
    assert cache.put(key_for("one"), CacheEntry(**answer_document("1"))) is False
    fake_monotonic.advance(llmpod.proxy.cache.RETRY_STORE_AFTER + 1)

    assert cache.put(key_for("two"), CacheEntry(**answer_document("2"))) is False

    assert cache.storing is False
    assert cache.store_disabled_reason is not None
    assert len(full_disk.attempts) == 2


# --------------------------------------------------------------------------------------------- delete / clear
async def test_delete_removes_the_file_and_the_entry(cache: ResponseCache, cache_dir: Path) -> None:
    a, b = key_for("keep"), key_for("drop")
    cache.put(a, CacheEntry(**answer_document("keep")))
    cache.put(b, CacheEntry(**answer_document("drop")))

    assert cache.delete(b) is True

    assert entry_files(cache_dir) == {f"{a}.json"}
    assert cache.get(b) is None
    assert cache.get(a) is not None
    assert cache.delete(b) is False
    assert cache.total_bytes == disk_bytes(cache_dir)


async def test_clear_removes_everything(cache: ResponseCache, cache_dir: Path) -> None:
    keys = [key_for(f"clear {i}") for i in range(3)]
    for key in keys:
        cache.put(key, CacheEntry(**answer_document(key[:5])))

    assert cache.clear() == 3

    assert entry_files(cache_dir) == set()
    assert len(cache) == 0
    assert cache.total_bytes == 0
    assert all(cache.get(key) is None for key in keys)


def test_path_for_a_key_is_inside_the_directory(cache: ResponseCache, cache_dir: Path) -> None:
    key = key_for("path")
    assert cache.path_for(key) == cache_dir / f"{key}.json"


@pytest.mark.parametrize(
    "not_a_key",
    [
        "../x",
        "../" + "0" * 61,
        "0" * 60 + "/../",
        "/etc/passwd",
        "",
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "0" * 64 + ".json",
        "0" * 64 + "\n",
    ],
)
def test_path_for_rejects_anything_but_a_key(cache: ResponseCache, not_a_key: str) -> None:
    with pytest.raises(ValueError, match="not a cache key"):
        cache.path_for(not_a_key)


# ------------------------------------------------------------------------------------- write-behind
async def _settle() -> None:
    """Let the writer's results (scheduled with call_soon_threadsafe) run on this loop."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_write_behind_serves_at_once_and_lands_on_disk(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path, max_entries=10, max_bytes=10**9)
    cache.load()
    cache.start_writer(asyncio.get_running_loop())
    key = cache_key("chat.completions", {"messages": [{"role": "user", "content": "write behind"}]}, KIND)
    assert cache.put(key, CacheEntry(**answer_document("behind")))
    answer = cache.get(key)  # before or after the write: always served
    assert answer is not None and answer.json_bytes() == orjson.dumps(answer_document("behind")["response"])
    await asyncio.to_thread(cache.stop_writer)
    await _settle()
    assert (tmp_path / f"{key}.json").exists() and key in cache
    assert not list(tmp_path.glob(".tmp-*"))


async def test_write_behind_delete_wins_over_a_write_in_progress(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path, max_entries=10, max_bytes=10**9)
    cache.load()
    cache.start_writer(asyncio.get_running_loop())
    key = cache_key("chat.completions", {"messages": [{"role": "user", "content": "deleted early"}]}, KIND)
    cache.put(key, CacheEntry(**answer_document("behind")))
    assert cache.delete(key)
    await asyncio.to_thread(cache.stop_writer)
    await _settle()
    assert cache.get(key) is None and key not in cache
    assert not (tmp_path / f"{key}.json").exists()


async def test_write_behind_failure_stops_storing_and_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ResponseCache(tmp_path, max_entries=10, max_bytes=10**9)
    cache.load()

    def disk_full(key: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "_write_atomically", disk_full)
    cache.start_writer(asyncio.get_running_loop())
    key = cache_key("chat.completions", {"messages": [{"role": "user", "content": "no room"}]}, KIND)
    cache.put(key, CacheEntry(**answer_document("behind")))
    await asyncio.to_thread(cache.stop_writer)
    await _settle()
    assert cache.store_disabled_reason is not None and cache.store_errors == 1
    assert key not in cache and cache.get(key) is None


# ------------------------------------------------------------------------------- loading behind (the proxy's start)
def on_disk(cache_dir: Path, *names: str) -> list[str]:
    """Entries written by an earlier proxy, last used in the order given (the first the longest ago)."""
    earlier = ResponseCache(cache_dir, max_entries=100, max_bytes=10**9)  # not loaded: the scan is held
    keys = [key_for(name) for name in names]
    for age, key in enumerate(keys):
        earlier.put(key, CacheEntry(**answer_document(key[:8])))
        set_last_use(cache_dir, key, 1_000_000 + age)
    return keys


async def test_entries_are_served_while_the_index_loads(cache_dir: Path, held_scan: HeldScan) -> None:
    old, _, newest = on_disk(cache_dir, "old", "newer", "newest")
    cache = ResponseCache(cache_dir, max_entries=3, max_bytes=10**9)

    loading = await held_scan.start(cache)
    assert cache.loading
    answer = cache.get(old)  # not indexed yet: found on disk, and now the most recent use
    assert answer is not None and answer.response == answer_document(old[:8])["response"]
    held_scan.release()
    await loading

    assert not cache.loading and len(cache) == 3 and cache.total_bytes == disk_bytes(cache_dir)
    cache.put(key_for("new"), CacheEntry(**answer_document("new")))  # over the limit: the least recently used goes
    assert entry_files(cache_dir) == {f"{key}.json" for key in (old, newest, key_for("new"))}


async def test_deletes_made_while_the_index_loads_stay_deleted(cache_dir: Path, held_scan: HeldScan) -> None:
    kept, deleted = on_disk(cache_dir, "kept", "deleted")
    cache = ResponseCache(cache_dir, max_entries=100, max_bytes=10**9)

    loading = await held_scan.start(cache)
    assert cache.get(deleted) is not None and cache.delete(deleted)
    held_scan.release()
    await loading

    assert deleted not in cache and cache.get(deleted) is None
    assert entry_files(cache_dir) == {f"{kept}.json"} and cache.total_bytes == disk_bytes(cache_dir)


async def test_a_clear_while_the_index_loads_removes_what_it_has_not_reached(
    cache_dir: Path, held_scan: HeldScan
) -> None:
    on_disk(cache_dir, "a", "b", "c")
    cache = ResponseCache(cache_dir, max_entries=100, max_bytes=10**9)

    loading = await held_scan.start(cache)
    assert cache.clear() == 3
    after = key_for("after the clear")
    cache.put(after, CacheEntry(**answer_document("after")))
    held_scan.release()
    await loading

    assert len(cache) == 1 and after in cache and entry_files(cache_dir) == {f"{after}.json"}


async def test_the_limits_hold_once_the_index_has_loaded(cache_dir: Path, held_scan: HeldScan) -> None:
    _, _, newest = on_disk(cache_dir, "oldest", "old", "newest")
    cache = ResponseCache(cache_dir, max_entries=2, max_bytes=10**9)

    loading = await held_scan.start(cache)
    fresh = key_for("fresh")
    # the oldest entries on disk are not known yet: nothing evicted
    cache.put(fresh, CacheEntry(**answer_document("fresh")))
    assert len(entry_files(cache_dir)) == 4
    held_scan.release()
    await loading

    assert entry_files(cache_dir) == {f"{newest}.json", f"{fresh}.json"}
    assert len(cache) == 2 and cache.evictions == 2


async def test_loading_behind_removes_crash_leftovers_before_serving(cache_dir: Path, held_scan: HeldScan) -> None:
    key = on_disk(cache_dir, "kept")[0]
    leftover = cache_dir / f".tmp-{key}-1234-5678"
    leftover.write_bytes(b'{"format": 1, "key": "')
    cache = ResponseCache(cache_dir, max_entries=100, max_bytes=10**9)

    loading = cache.load_behind()
    assert not leftover.exists()  # gone before the first request, not whenever the scan gets there
    held_scan.release()
    await loading
    assert entry_files(cache_dir) == {f"{key}.json"}


async def test_a_directory_removed_while_the_index_loads_is_an_empty_cache(
    cache_dir: Path, held_scan: HeldScan
) -> None:
    on_disk(cache_dir, "a", "b")
    cache = ResponseCache(cache_dir, max_entries=100, max_bytes=10**9)
    held_scan.look_late = True

    loading = await held_scan.start(cache)
    shutil.rmtree(cache_dir)  # the scan has its list of names, and neither the files nor the directory are there
    held_scan.release()
    await loading

    assert len(cache) == 0 and cache.total_bytes == 0 and not cache.loading
    key = key_for("stored again")
    assert cache.put(key, CacheEntry(**answer_document("again"))) and cache.get(key) is not None
