#!/usr/bin/env python3
"""A relay in front of the mock that makes it look like a vLLM pod behind RunPod's proxy, for the kilo_turn bench.

    python3 bench/wan_relay.py --port P --upstream http://127.0.0.1:M --delay 0.08 --release 0.33.0
                               --max-model-len 32768

Every call pays ``--delay`` seconds before it is answered (a WAN round trip: /version, /v1/models, /tokenize and
generation alike). ``GET /version`` answers ``--release``, and a chat request is checked as that release checks
it (``llmpod/proxy/context_fit.py`` quotes the vLLM source): from 0.32.0, only ``max_tokens`` over the context is a 400
and the rest is lowered here, as vLLM does; before, prompt + ``max_tokens`` over it is a 400 too. The prompt is
counted by the mock's ``/tokenize`` on loopback, without the delay: that is the pod's own work. ``GET
/relay/stats`` counts the calls received by path (with no delay).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llmpod.proxy.context_fit import lowers_max_tokens_itself, parse_version  # noqa: E402


def create_app(upstream: str, delay: float, release: str, max_model_len: int) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=60)
    calls: Counter[str] = Counter()
    lowers_itself = lowers_max_tokens_itself(parse_version(release))

    def refused(message: str, param: str) -> Response:
        return JSONResponse(
            {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}, status_code=400
        )

    async def check(body: dict[str, Any]) -> Response | dict[str, Any]:
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        wanted = body.get(field)
        if not isinstance(wanted, int):
            return body
        context = f"max_model_len={'' if lowers_itself else 'max_total_tokens='}{max_model_len}"
        if wanted > max_model_len:
            return refused(
                f"{field}={wanted} cannot be greater than {context}. Please request fewer output tokens. "
                f"(parameter={field}, value={wanted})",
                field,
            )
        counted = await client.post(
            "/tokenize", json={"model": body.get("model"), "messages": body.get("messages"), "tools": body.get("tools")}
        )
        if counted.status_code != 200:
            return Response(counted.content, counted.status_code, media_type="application/json")
        prompt = int(counted.json()["count"])
        if lowers_itself:  # vLLM 0.33: a prompt alone over the context is refused, the rest is lowered
            if prompt > max_model_len:
                return refused(
                    f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                    f"contains at least {max_model_len + 1} input tokens, which exceeds this limit even "
                    "without any output tokens. Please reduce the length of the input prompt. "
                    f"(parameter=input_tokens, value={max_model_len + 1})",
                    "input_tokens",
                )
            if prompt == max_model_len:  # get_max_tokens gives 0, which SamplingParams refuses
                return refused("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens")
            return {**body, field: min(wanted, max_model_len - prompt)}
        if prompt + wanted > max_model_len:
            return refused(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{wanted} output tokens and your prompt contains {prompt} input tokens, for a total of "
                f"{prompt + wanted} tokens. Please reduce the length of the input prompt or the number "
                f"of requested output tokens. (parameter=input_tokens, value={prompt})",
                "input_tokens",
            )
        return body

    async def relay(request: Request) -> Response:
        calls[request.url.path] += 1
        await asyncio.sleep(delay)
        if request.url.path == "/version":
            return JSONResponse({"version": release})
        content = await request.body()
        if request.url.path == "/v1/chat/completions":
            checked = await check(orjson.loads(content))
            if isinstance(checked, Response):
                return checked
            content = orjson.dumps(checked)
        headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type")}
        sent = client.build_request(request.method, request.url.path, content=content, headers=headers)
        answer = await client.send(sent, stream=True)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
            background=BackgroundTask(answer.aclose),
        )

    async def stats(request: Request) -> Response:
        return JSONResponse(dict(calls))

    return Starlette(routes=[Route("/relay/stats", stats), Route("/{path:path}", relay, methods=["GET", "POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--delay", type=float, default=0.08)
    parser.add_argument("--release", default="0.33.0")
    parser.add_argument("--max-model-len", type=int, default=32768)
    args = parser.parse_args()
    app = create_app(args.upstream, args.delay, args.release, args.max_model_len)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
