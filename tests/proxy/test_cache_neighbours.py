"""Another local user against the cache and the log: the defaults live in a shared /tmp (issue 16).

Whoever creates ``/tmp/llm_cache`` or ``/tmp/proxy_fastapi.log`` first owns it. "Another user" cannot be
faked without root: when the suite runs as root (CI containers), a file is ``chown``-ed to uid 65534
(nobody) in ``tmp_path`` to stand for one; otherwise those tests are skipped. The rest need no privilege.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

import llmpod.proxy.cache
from llmpod.errors import ConfigError
from llmpod.proxy._requestlog import RequestLog
from llmpod.proxy.cache import CacheEntry, ResponseCache
from llmpod.proxy.metrics import ProxyMetrics
from tests.proxy.test_cache import answer_document, key_for
from tests.proxy.test_cli import run_proxy

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file another user's")


def loaded(directory: Path) -> ResponseCache:
    cache = ResponseCache(directory, max_entries=100, max_bytes=10**9)
    cache.load()
    return cache


def entry(text: str = "four") -> CacheEntry:
    document = answer_document(text)
    return CacheEntry(**{name: document[name] for name in CacheEntry.__slots__ if name in document})


# ------------------------------------------------------------------------------------------ the directory
def test_cache_dir_and_entries_are_private(tmp_path: Path) -> None:
    os.umask(umask := os.umask(0o022))  # the usual umask: the old code made 0755 and 0644 under it
    try:
        cache = loaded(tmp_path / "cache")
        key = key_for("2+2?")
        assert cache.put(key, entry())
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "cache" / f"{key}.json").stat().st_mode) == 0o600


def test_our_cache_dir_readable_by_others_is_closed(tmp_path: Path) -> None:
    """A cache dir an older version made (0755, entries 0644): other users could read every prompt in it."""
    old = tmp_path / "cache"
    old.mkdir()
    old.chmod(0o755)
    key = key_for("2+2?")
    (old / f"{key}.json").write_bytes(b"{}")
    (old / f"{key}.json").chmod(0o644)
    loaded(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o700


def test_a_cache_dir_that_cannot_be_made_yet_is_retried_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not made now (its parent is a file, or not mounted yet) is not "another user's": storing resumes once it can
    be made, after the usual pause."""
    monkeypatch.setattr(llmpod.proxy.cache, "RETRY_STORE_AFTER", 0.0)
    blocker = tmp_path / "blocker"
    blocker.write_text("where the cache's parent should be")
    cache = loaded(blocker / "cache")
    assert cache.store_disabled_reason is not None and "cannot" in cache.store_disabled_reason
    blocker.unlink()
    key = key_for("2+2?")
    assert cache.put(key, entry()) and cache.get(key) is not None
    assert stat.S_IMODE((blocker / "cache").stat().st_mode) == 0o700


def test_cache_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "cache"
    planted.mkdir()
    planted.chmod(0o777)  # /tmp/llm_cache made first by someone who wants to plant answers in it
    key = key_for("2+2?")
    (planted / f"{key}.json").write_bytes(b"{}")
    cache = loaded(planted)
    assert cache.get(key) is None and not cache.storing
    assert cache.store_disabled_reason is not None and "writable by others" in cache.store_disabled_reason
    result = run_proxy({"CACHE_DIR": str(planted), "LOG_FILE": str(tmp_path / "p.log")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"proxy_fastapi: cache dir {planted} is writable by others: remove it or set CACHE_DIR"
    ]


@as_root
def test_cache_dir_of_another_user_is_refused_at_start(tmp_path: Path) -> None:
    planted = tmp_path / "cache"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)  # root stands in for the other user (module doc)
    result = run_proxy({"CACHE_DIR": str(planted), "LOG_FILE": str(tmp_path / "p.log")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"proxy_fastapi: cache dir {planted} is owned by uid {NOBODY}: remove it or set CACHE_DIR"
    ]


# ------------------------------------------------------------------------------------------ entries
@as_root
def test_an_entry_owned_by_another_user_is_not_served_nor_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    first = loaded(directory)
    key = key_for("2+2?")
    assert first.put(key, entry("planted answer"))
    os.chown(directory / f"{key}.json", NOBODY, NOBODY)  # root stands in for the other user (module doc)
    cache = loaded(directory)
    assert key not in cache and cache.get(key) is None
    # written while indexed, swapped for another user's afterwards: skipped and counted at read time
    other = key_for("3+3?")
    assert cache.put(other, entry("ours"))
    os.chown(directory / f"{other}.json", NOBODY, NOBODY)
    assert cache.get(other) is None and cache.foreign_skipped == 1
    cache.clear()
    assert (directory / f"{key}.json").exists() and (directory / f"{other}.json").exists()


def test_a_fifo_planted_as_an_entry_does_not_freeze_the_proxy(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = loaded(directory)
    key = key_for("2+2?")
    assert cache.put(key, entry())
    path = directory / f"{key}.json"
    path.unlink()
    os.mkfifo(path)  # swapped in after indexing: the old code's open() waited for a writer forever
    results: list[object] = []
    reader = threading.Thread(target=lambda: results.append(cache.get(key)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # unblock the stuck open so the test run can end, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("reading a FIFO planted as a cache entry blocked")
    assert results == [None] and cache.foreign_skipped == 1
    assert ProxyMetrics(cache).as_json(0)["cache_foreign_skipped"] == 1
    assert stat.S_ISFIFO(path.lstat().st_mode)  # not ours to delete


def test_a_symlink_planted_as_an_entry_is_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = loaded(directory)
    key = key_for("2+2?")
    assert cache.put(key, entry())
    path = directory / f"{key}.json"
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    os.symlink(outside, path)
    assert cache.get(key) is None
    assert loaded(directory).get(key) is None


def test_start_up_removes_only_our_own_temp_files(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    ours = directory / f".tmp-{key_for('2+2?')}-1234-5678"  # what write_atomically names a write in progress
    theirs = directory / ".tmp-notes"  # someone's file that merely starts alike
    ours.write_bytes(b"half")
    theirs.write_bytes(b"keep me")
    loaded(directory)
    assert not ours.exists() and theirs.read_bytes() == b"keep me"


@as_root
def test_start_up_keeps_another_users_file_named_like_our_temp_files(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    foreign = directory / f".tmp-{key_for('2+2?')}-1234-5678"
    foreign.write_bytes(b"theirs")
    os.chown(foreign, NOBODY, NOBODY)  # root stands in for the other user (module doc)
    loaded(directory)
    assert foreign.exists()


# ------------------------------------------------------------------------------------------ the log
def test_a_log_file_symlink_is_not_followed(tmp_path: Path) -> None:
    bashrc = tmp_path / "bashrc"
    bashrc.write_text("alias ll='ls -l'\n")
    planted = tmp_path / "proxy_fastapi.log"
    os.symlink(bashrc, planted)
    with pytest.raises(ConfigError, match="symbolic link: remove it or set LOG_FILE"):
        RequestLog(planted)
    result = run_proxy({"CACHE_DIR": str(tmp_path / "c"), "LOG_FILE": str(planted)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"proxy_fastapi: log file {planted} is a symbolic link: remove it or set LOG_FILE"
    ]
    assert bashrc.read_text() == "alias ll='ls -l'\n"


def test_a_log_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    planted = tmp_path / "proxy_fastapi.log"
    os.mkfifo(planted)
    result = run_proxy({"CACHE_DIR": str(tmp_path / "c"), "LOG_FILE": str(planted)}, timeout=20)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "LOG_FILE" in result.stderr


@as_root
def test_a_log_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "proxy_fastapi.log"
    planted.write_text("")
    os.chown(planted, NOBODY, NOBODY)  # root stands in for the other user (module doc)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}: remove it or set LOG_FILE"):
        RequestLog(planted)
    assert planted.read_text() == ""


def test_logged_model_names_carry_no_control_or_shell_characters(client: httpx.Client, tmp_path: Path) -> None:
    hostile = "x\n$(touch /tmp/pwned); `id` 'q' \"d\" | > \x1b[2J"
    client.post("/v1/chat/completions", json={"model": hostile, "messages": [{"role": "user", "content": "hi"}]})
    deadline = time.monotonic() + 5
    while True:  # the line is written once the answer has gone out: it may land just after
        lines = [line for line in (tmp_path / "proxy.log").read_text().splitlines() if "POST /v1/" in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(lines) == 1
    field = lines[0].split(" model=", 1)[1].split(" status=", 1)[0]
    assert not set(field) & set("\n\x1b$();`'\"|> "), field
