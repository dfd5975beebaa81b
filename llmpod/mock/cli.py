"""Run the mock vLLM server: ``python3 mock_vllm_server.py --port 8001 --model NAME``.

Flags follow ``vllm serve`` where vLLM has one; every mock switch can also come from ``MOCK_<NAME>``
(``MOCK_CHUNK_DELAY=0.05``). A flag wins over its environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import uvicorn
from pydantic import ValidationError

from llmpod.mock.server import MockSettings, create_app

_N = TypeVar("_N", int, float)

# flag -> (settings field or None for a server option, environment variable)
FLAGS: dict[str, tuple[str | None, str | None]] = {
    "--model": ("model", "MODEL_NAME"),
    "--served-model-name": ("served_model_name", None),
    "--max-model-len": ("max_model_len", None),
    "--api-key": ("api_key", "VLLM_API_KEY"),
    "--first-token-delay": ("first_token_delay", "MOCK_FIRST_TOKEN_DELAY"),
    "--chunk-delay": ("chunk_delay", "MOCK_CHUNK_DELAY"),
    "--chunk-count": ("chunk_count", "MOCK_CHUNK_COUNT"),
    "--error-rate": ("error_rate", "MOCK_ERROR_RATE"),
    "--rate-limit-rate": ("rate_limit_rate", "MOCK_RATE_LIMIT_RATE"),
    "--retry-after": ("retry_after", "MOCK_RETRY_AFTER"),
    "--seed": ("seed", "MOCK_SEED"),
    "--die-after-chunks": ("die_after_chunks", "MOCK_DIE_AFTER_CHUNKS"),
    "--stream-fault": ("stream_fault", "MOCK_STREAM_FAULT"),
    "--stream-fault-after": ("stream_fault_after", "MOCK_STREAM_FAULT_AFTER"),
    "--stream-fault-rate": ("stream_fault_rate", "MOCK_STREAM_FAULT_RATE"),
    "--reasoning": ("reasoning", "MOCK_REASONING"),
    "--wire-format": ("wire_format", "MOCK_WIRE_FORMAT"),
    "--enable-auto-tool-choice": ("enable_auto_tool_choice", None),
    "--tool-call-parser": ("tool_call_parser", None),
    "--mark-kind": ("mark_kind", "MOCK_MARK_KIND"),
    "--host": (None, None),
    "--port": (None, "PORT"),
    "--slow-start": (None, "MOCK_SLOW_START"),
}

# `vllm serve` options that mean nothing to the mock: accepted and ignored, so a pod's command line runs here.
IGNORED_OPTIONS = (
    "--dtype",
    "--quantization",
    "--gpu-memory-utilization",
    "--tensor-parallel-size",
    "--max-num-seqs",
    "--kv-cache-dtype",
    "--reasoning-parser",
    "--chat-template",
    "--download-dir",
    "--tokenizer",
    "--revision",
)
IGNORED_SWITCHES = (
    "--trust-remote-code",
    "--enforce-eager",
    "--enable-prefix-caching",
    "--disable-log-requests",
    "--disable-log-stats",
)


class UsageError(Exception):
    """A bad flag or environment value; reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


_SERVER_HELP = {
    "--host": "address to listen on (default 127.0.0.1)",
    "--port": "port (default 8001)",
    "--slow-start": "seconds during which connections are refused, like vLLM loading weights",
}


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mock_vllm_server.py",
        allow_abbrev=False,
        description="A mock of vLLM's OpenAI-compatible server, for tests and local runs.",
    )
    for flag, (field, env_name) in FLAGS.items():
        about = MockSettings.model_fields[field].description if field else _SERVER_HELP[flag]
        about = f"{about} [env {env_name}]" if env_name else about
        if flag in ("--reasoning", "--enable-auto-tool-choice"):
            parser.add_argument(flag, action="store_const", const="true", help=about)
        else:
            parser.add_argument(flag, metavar=flag[2:].replace("-", "_").upper(), help=about)
    for flag in IGNORED_OPTIONS:
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in IGNORED_SWITCHES:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return parser


def parse(argv: Sequence[str], env: Mapping[str, str]) -> tuple[MockSettings, str, int, float]:
    """Settings, host, port and slow-start seconds from flags, then environment, then defaults."""
    args = vars(_parser().parse_args(argv))
    raw: dict[str, str] = {}
    source: dict[str, str] = {}  # settings field -> the flag or variable its value came from
    for flag, (field, env_name) in FLAGS.items():
        value, source[field or flag] = args[flag[2:].replace("-", "_")], flag
        if value is None and env_name:
            value, source[field or flag] = env.get(env_name), env_name
        if value is not None:
            raw[field or flag] = value
    port = _number(raw.pop("--port", "8001"), source["--port"], int, 1, 65535)
    slow_start = _number(raw.pop("--slow-start", "0"), source["--slow-start"], float, 0, None)
    host = raw.pop("--host", "127.0.0.1")
    try:
        settings = MockSettings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check across fields: its message names the flags (as vLLM's does)
            raise UsageError(str(first["msg"]).removeprefix("Value error, ").removeprefix("Error: ")) from None
        field = str(first["loc"][0])
        raise UsageError(f"{source.get(field, field)}: {first['msg']}") from None
    return settings, host, port, slow_start


def _number(text: str, flag: str, kind: type[_N], low: _N, high: _N | None) -> _N:
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{flag}: expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise UsageError(f"{flag}: {text} is out of range") from None
    return value


async def serve(settings: MockSettings, host: str, port: int, slow_start: float) -> None:
    """Bind now, listen only after ``slow_start`` seconds (like vLLM loading weights), then serve."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound but not listening: connections are refused, as during vLLM's startup
    if slow_start:
        await asyncio.sleep(slow_start)
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        print(f"mock vLLM serving {settings.served_name!r} on http://{host}:{port}", file=sys.stderr, flush=True)
    await task


def _run(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed, as uvicorn's own runner picks: with the stdlib loop a keep-alive client saw
    ~40 ms per request here (a Nagle/delayed-ACK stall), which made the mock a misleading baseline."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run until interrupted; 2 for bad flags, 1 if the port cannot be bound."""
    try:
        settings, host, port, slow_start = parse(sys.argv[1:] if argv is None else argv, os.environ)
    except UsageError as exc:
        print(f"mock_vllm_server.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        _run(serve(settings, host, port, slow_start))
    except OSError as exc:
        print(f"mock_vllm_server.py: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
