#!/usr/bin/env python3
"""The benchmark's miss floor: the thinnest forwarder on the proxy's stack, to say what a miss could cost.

    python3 bench/floor_app.py --port P --upstream http://127.0.0.1:M

A raw ASGI app on uvicorn, configured as ``proxy_fastapi.py`` runs it (uvloop and httptools when installed),
whose ``POST /v1/chat/completions`` does only what every miss must: read the body, ask the upstream for a
stream with the proxy's own upstream client (``llmpod.proxy._http.HTTPPool``), as the proxy does, and
either read it to the end and answer with the last event's bytes, or (``"stream": true``) pass each piece on
as it arrives. No cache, no coalescing, no parsing of the stream, no log, no metrics: what a miss through
the proxy costs beyond this is the proxy's own work; what this costs beyond the mock answering directly is
the second hop and the upstream streaming on this machine (with three processes sharing its CPUs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llmpod.proxy._http import HTTPPool  # noqa: E402

Scope = dict[str, Any]
JSON_HEADERS = {"Content-Type": "application/json"}


def create_app(upstream: str) -> Any:
    pool: HTTPPool | None = None

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal pool
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            pool = HTTPPool(upstream, connect_timeout=5.0, read_timeout=60.0)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await pool.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "GET":  # /health, for the benchmark's start-up wait
            await answer(send, 200, b'{"status":"healthy"}')
            return
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = orjson.loads(b"".join(parts))
        streamed = body.get("stream") is True
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        assert pool is not None
        response = await pool.post(scope["path"], orjson.dumps(body), JSON_HEADERS)
        if streamed:  # pass each piece on as it comes
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            while piece := await response.next_chunk():
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            response.release()
            await send({"type": "http.response.body", "body": b""})
            return
        data = await response.read()
        response.release()
        events = data.rstrip().split(b"\n\n")
        last = events[-2] if len(events) > 1 else events[-1]  # the usage chunk, before [DONE]
        await answer(send, response.status, last.removeprefix(b"data: "))

    return app


async def answer(send: Any, status: int, content: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": content})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the mock's origin, http://127.0.0.1:PORT")
    args = parser.parse_args(argv)

    import uvicorn

    config = uvicorn.Config(
        create_app(args.upstream),
        host=args.host,
        port=args.port,
        loop="auto",
        http="auto",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
