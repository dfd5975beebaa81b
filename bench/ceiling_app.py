#!/usr/bin/env python3
"""The benchmark's ceiling: the proxy's server stack with no work behind it.

    python3 bench/ceiling_app.py --port P

A FastAPI app on uvicorn, configured as ``proxy_fastapi.py`` runs it (uvloop and httptools when installed),
whose ``POST /v1/chat/completions`` reads the body and answers fixed bytes shaped like a chat completion. A
cache hit can at best approach this.
"""

from __future__ import annotations

import argparse
import sys

from fastapi import FastAPI, Request
from starlette.responses import Response

# About the size of the mock's answer to a short question (what a benchmark cache hit returns).
ANSWER = (
    b'{"id":"chatcmpl-0123456789abcdef","object":"chat.completion","created":1795348527,"model":"m",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Mock answer to: bench ceiling summit '
    b'quartz lantern canyon kelp orchid","tool_calls":[]},"logprobs":null,"finish_reason":"stop",'
    b'"stop_reason":null}],"usage":{"prompt_tokens":8,"total_tokens":20,"completion_tokens":12}}'
)


def create_app() -> FastAPI:
    app = FastAPI(title="llmpod benchmark ceiling")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        await request.body()
        return Response(ANSWER, media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"healthy"}', media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    import uvicorn

    config = uvicorn.Config(
        create_app(), host=args.host, port=args.port, loop="auto", http="auto", access_log=False, log_level="warning"
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
