"""Run the llmpod caching proxy: an OpenAI-compatible endpoint in front of a vLLM server.

    RUNPOD_ENDPOINT=http://127.0.0.1:8001/v1 python3 proxy_fastapi.py [--host 127.0.0.1] [--port 8000]

Settings come from the environment (see README, "Proxy settings"). Exit code 2: a bad setting or a busy
port (one line on stderr says which). SIGTERM or Ctrl-C refuses new connections, closes idle ones, lets requests
in flight finish for PROXY_DRAIN_SECONDS (5 s), then ends what is left with an OpenAI-shaped error (drain.py) and
exits with the signal's status, as uvicorn does (killed by SIGTERM or SIGINT: 143 or 130 in a shell), with no
traceback.
"""

from __future__ import annotations

import argparse
import math
import signal
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmpod.proxy.settings import ProxySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to bind (env PROXY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (env PROXY_PORT, default 8000)")
    args = parser.parse_args(argv)

    from llmpod.errors import LlmpodError
    from llmpod.proxy.settings import ProxySettings

    try:
        settings = ProxySettings.from_env(host=args.host, port=args.port)
        _check_files(settings)
        sock = _bind(settings.host, settings.port)
    except LlmpodError as exc:
        print(f"proxy_fastapi: {exc}", file=sys.stderr)
        return exc.exit_code

    # the server stack is imported only once the settings and the port are known to be good: a bad setting
    # is reported in a fraction of the time (FastAPI alone takes ~0.5 s to import)
    import uvicorn

    from llmpod.proxy.app import create_app
    from llmpod.proxy.connections import auto_protocol, connection_limits, guarded_protocol, raise_descriptor_limit
    from llmpod.proxy.drain import BACKSTOP_SECONDS, Drain, DrainingServer

    print(
        f"proxy_fastapi: serving http://{settings.host}:{settings.port}/v1 -> {settings.upstream_base} "
        f"(cache {settings.cache_dir}, log {settings.log_file or 'stderr only'})",
        file=sys.stderr,
    )
    drain = Drain(create_app(settings), settings.drain_seconds)
    # bounded request-head time and connections per client (slowloris), within a raised descriptor limit
    limits = connection_limits(
        settings.header_timeout, settings.max_client_connections, settings.max_connections, raise_descriptor_limit()
    )
    config = uvicorn.Config(
        drain,
        log_level="warning",
        access_log=False,
        # a backstop only: the drain ends every request first (uvicorn's setting is typed as whole seconds)
        timeout_graceful_shutdown=math.ceil(settings.drain_seconds + BACKSTOP_SECONDS),
        loop="auto",
        http=guarded_protocol(auto_protocol(), limits),
        ws="none",  # no WebSocket routes: an upgraded connection would leave the guard's count
    )
    try:
        DrainingServer(config, drain).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises the Ctrl-C it handled once it has stopped: end as Python would, without the traceback
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
    return 0


def _check_files(settings: ProxySettings) -> None:
    """Refuse (``ConfigError``) a cache dir or log file another local user could have planted."""
    from llmpod.proxy._cache_files import check_directory
    from llmpod.proxy._requestlog import open_log

    check_directory(settings.cache_dir)
    if settings.log_file is not None:
        open_log(settings.log_file).close()


def _bind(host: str, port: int) -> socket.socket:
    from llmpod.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror} (is another proxy running? set PROXY_PORT or --port)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
