"""One line per request, written straight to the log file (or stderr when there is none).

The logging module costs ~12% of a cache hit's time (locks, formatting, two handlers); this writes one
preformatted line with one system call. Warnings and errors still go through ``logging``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import TextIO

from llmpod.errors import ConfigError

LOG_NAME_CHARS = 200  # a client's name longer than this is cut in the log (30 MB would fill the disk)
# what a logged client field may hold as is: no control characters, no shell metacharacters, no quotes
_PLAIN = re.compile(r"[A-Za-z0-9._:/@+=,-]*\Z")


def loggable(value: str) -> str:
    """A client-chosen field as it may go into the log: as is if plain, else every other character escaped
    (``\\xNN``), unquoted. A newline would forge log lines; ``;``, ``$(``, quotes would run as shell if the
    log ever landed in a file a shell reads."""
    value = value[:LOG_NAME_CHARS]
    if _PLAIN.match(value):
        return value
    return "".join(c if _PLAIN.match(c) else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in value)


def open_log(path: Path) -> TextIO:
    """``path`` opened to append, line-buffered; refuses (``ConfigError``, one line, the fix) a symbolic link,
    something that is not a regular file, or a file another user owns: the default lives in a shared /tmp,
    where a planted link to ``~/.bashrc`` would get our lines appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(f"log file {path} is a symbolic link: remove it or set LOG_FILE") from None
        raise ConfigError(f"cannot open log file {path}: {exc.strerror} (remove it or set LOG_FILE)") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}"
    if problem is not None:
        os.close(fd)
        raise ConfigError(f"log file {path} {problem}: remove it or set LOG_FILE")
    os.set_blocking(fd, True)
    # kept open for the proxy's life (the caller closes it); line-buffered: one write per line
    return open(fd, "a", buffering=1, encoding="utf-8")


class LogFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The ``logging`` handler for the log file, opened by ``open_log`` (``FileHandler`` follows links)."""

    def __init__(self, path: Path) -> None:
        super().__init__(open_log(path))

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.close()
        super().close()


class RequestLog:
    def __init__(self, path: Path | None) -> None:
        self._stream: TextIO
        self._owned = path is not None
        if path is not None:
            self._stream = open_log(path)  # closed in close()
        else:
            self._stream = sys.stderr
        self._second = -1
        self._stamp = ""

    def write(self, line: str) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # formatting the date is the expensive part: once a second
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        with contextlib.suppress(OSError, ValueError):  # a full disk or a closed stderr must not fail a request
            self._stream.write(f"{self._stamp},{int(now % 1 * 1000):03d} INFO llmpod.proxy {line}\n")

    def close(self) -> None:
        if self._owned:
            self._stream.close()
