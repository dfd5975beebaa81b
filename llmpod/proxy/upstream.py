"""The proxy's side of the vLLM server: model ids, context limits, streams and health.

Two shared clients, both owned by the app's lifespan: an ``HTTPPool`` (``upstream_http``) for the
generation streams, the hot path of every miss, and an ``httpx.AsyncClient`` for the rare calls (model list,
``/version``, ``/tokenize``, health). Failures become ``UpstreamError`` with the status the proxy should answer and an
OpenAI-shaped body that names the upstream: unreachable 502, timed out 504, vLLM's own 4xx/5xx passed through
(old flat errors normalised).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpx
import orjson

from llmpod.backends import Backend
from llmpod.errors import UpstreamError
from llmpod.proxy._http import HTTPPool, UpstreamConnectionError, UpstreamReadTimeout, UpstreamResponse
from llmpod.proxy.context_fit import (
    PromptMemory,
    cap_max_tokens,
    fit,
    is_int,
    lowers_max_tokens_itself,
    parse_version,
    refusal_from_error,
)
from llmpod.proxy.settings import ProxySettings, upstream_base
from llmpod.proxy.wire import error_body, normalise_error
from llmpod.server_kind import kind_of

log = logging.getLogger("llmpod.proxy")

UNKNOWN_KIND_NOTE = (
    "no cached answer is served until the upstream has answered once and so said what kind of server it is "
    "(UPSTREAM_KIND=vllm or mock tells the proxy beforehand)"
)
MODELS_TTL = 60.0  # seconds a /v1/models answer is trusted
MODELS_RETRY = 5.0  # an unknown model name refreshes the list at most this often
MAX_ERROR_BODY = 64 * 1024
# a chat request's fields that shape the rendered prompt, which vLLM 0.33's /tokenize also takes
# (vllm/entrypoints/serve/tokenize/protocol.py, TokenizeChatRequest)
PROMPT_SHAPING_FIELDS = (
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
)


@dataclass(frozen=True, slots=True)
class ServedModel:
    id: str
    max_model_len: int | None


def _tokens(name: str) -> set[str]:
    return {part for part in re.split(r"[-_/.:\s]+", name.lower()) if part}


def match_model(requested: str, served: list[ServedModel]) -> ServedModel | None:
    """The served model a client's name means: the full id, the part after the last ``/``, any case;
    failing those, the one served id whose name parts include all of the requested name's parts
    (``deepseek-coder-33b-awq`` -> ``TheBloke/deepseek-coder-33B-instruct-AWQ``)."""
    lowered = requested.lower()
    for rule in (
        lambda m: m.id == requested,
        lambda m: m.id.lower() == lowered,
        lambda m: m.id.rsplit("/", 1)[-1].lower() == lowered.rsplit("/", 1)[-1],
    ):
        hits = [m for m in served if rule(m)]
        if len(hits) == 1:
            return hits[0]
    wanted = _tokens(requested)
    if wanted:
        hits = [m for m in served if wanted <= _tokens(m.id)]
        if len(hits) == 1:
            return hits[0]
    return None


def stream_pool(settings: ProxySettings, base: str | None = None) -> HTTPPool:
    """The connection pool for generation streams to ``base``'s origin (default ``settings.upstream_base``)."""
    parts = urlsplit(base or settings.upstream_base)
    # certifi's CA bundle, as httpx uses: Pythons without system certificates (python.org on macOS) would
    # otherwise refuse every https://…proxy.runpod.net pod
    tls = ssl.create_default_context(cafile=certifi.where()) if parts.scheme == "https" else None
    return HTTPPool(
        f"{parts.scheme}://{parts.netloc}",
        connect_timeout=min(10.0, settings.upstream_timeout),
        read_timeout=settings.upstream_timeout,
        ssl_context=tls,
    )


class Upstream:
    """Talks to the vLLM OpenAI server at ``settings.upstream_base``, or at one ``backend``'s (issue 18)."""

    def __init__(
        self,
        settings: ProxySettings,
        client: httpx.AsyncClient,
        pool: HTTPPool | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.pool = pool
        self.base = upstream_base(backend.base_url) if backend else settings.upstream_base
        self._base_path = urlsplit(self.base).path.rstrip("/")
        self.root = self.base[: -len("/v1")] if self.base.endswith("/v1") else self.base
        self.timeout = settings.upstream_timeout
        # listing models is instant on a live vLLM: don't let an editor's model picker hang for minutes
        self.listing_timeout = min(self.timeout, 10.0)
        self.client = client
        self.headers = {"Content-Type": "application/json"}
        key = backend.api_key if backend else settings.upstream_api_key
        if key is not None:
            self.headers["Authorization"] = f"Bearer {key.get_secret_value()}"
        self._models: list[ServedModel] | None = None
        self._models_at = 0.0
        self._models_fetch: asyncio.Future[list[ServedModel] | None] | None = None
        self.version: str | None = None  # vLLM's, from GET /version, asked with the first model list
        self.lowers_itself = False  # the release fits prompt + max_tokens itself (context_fit's doc)
        self.prompts = PromptMemory()
        # The kind of server answering (llmpod/server_kind.py), which every cache key names; None = unknown, and
        # then no cached answer is served. It starts as the pod manager's UPSTREAM_KIND (so a pod still starting
        # or being replaced finds its answers) and is set by what the upstream's answers say (``observe``), which
        # wins: a model list at least every MODELS_TTL, and every generation stream.
        self.expected_kind: str | None = backend.kind if backend else settings.upstream_kind
        self.kind: str | None = self.expected_kind
        self.lost_at = 0.0  # when it was last found unreachable (monotonic): the health prober looks again at once

    # ----------------------------------------------------------------- errors
    def unreachable(self, exc: BaseException) -> UpstreamError:
        # with the kind unknown no cached answer stood in (llmpod/server_kind.py): the message says so
        unsure = "" if self.kind else f"; {UNKNOWN_KIND_NOTE}"
        if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError | UpstreamReadTimeout):
            message = f"upstream {self.base} did not answer within {self.timeout:g}s{unsure}"
            return UpstreamError(504, error_body(message, 504))
        reason = str(exc) or type(exc).__name__
        return UpstreamError(502, error_body(f"upstream {self.base} is unreachable: {reason}{unsure}", 502))

    def rejected(self, status: int, content: bytes, headers: Mapping[str, str]) -> UpstreamError:
        try:
            payload: Any = orjson.loads(content)
        except orjson.JSONDecodeError:
            payload = None
        body = normalise_error(status, payload, content.decode("utf-8", "replace"))
        if status == 401:
            body["error"]["message"] = (
                f"upstream {self.base} rejected the proxy's key: check UPSTREAM_API_KEY "
                f"(upstream said: {body['error']['message']})"
            )
        passed = {name: headers[name] for name in ("retry-after", "retry-after-ms") if name in headers}
        return UpstreamError(status, body, passed)

    # ----------------------------------------------------------------- kind
    def observe(self, headers: Mapping[str, str]) -> str | None:
        """The kind a successful upstream answer's ``headers`` show; it becomes the proxy's (one line when that
        contradicts what the proxy believed)."""
        seen = kind_of(headers)
        if seen != self.kind:
            if self.kind is not None:
                log.warning(
                    "upstream %s answers as %s, not %s: cached answers are now looked up as %s's",
                    self.base,
                    seen or "an unknown kind of server",
                    self.kind,
                    seen or "nobody",
                )
            self.kind = seen
        return seen

    def lost(self) -> None:
        """The upstream could not be reached: another server may come up at its address. Back to what the pod
        manager said (unknown when run by hand) until the next model list, which the next request asks for."""
        self.kind = self.expected_kind
        self._models_at = 0.0
        self.lost_at = time.monotonic()

    # ----------------------------------------------------------------- models
    @property
    def known_models(self) -> list[ServedModel]:
        return self._models or []  # the last list fetched, without asking

    async def models(self, *, refresh: bool = False) -> list[ServedModel] | None:
        """The served models, from a cached ``/v1/models`` answer; None when the upstream is down.

        One fetch at a time: when the list expires under load, every request waits for the same one
        (100 clients would otherwise ask vLLM 100 times at once).
        """
        age = time.monotonic() - self._models_at
        if self._models is not None and age < MODELS_TTL and not (refresh and age > MODELS_RETRY):
            return self._models
        if self._models_fetch is None or self._models_fetch.done():
            self._models_fetch = asyncio.ensure_future(self._fetch_models())
        # shielded: one caller leaving (its client hung up) must not cancel the fetch the others wait for
        return await asyncio.shield(self._models_fetch)

    async def _fetch_models(self) -> list[ServedModel] | None:
        listing = self.client.get(f"{self.base}/models", headers=self.headers, timeout=self.listing_timeout)
        try:
            if self.version is None:  # asked once, beside the first list: it adds no wait of its own
                response, _ = await asyncio.gather(listing, self._fetch_version())
            else:
                response = await listing
            response.raise_for_status()
            data = orjson.loads(response.content)["data"]
            self.observe(response.headers)
            self._models = [
                ServedModel(str(card["id"]), card.get("max_model_len") if is_int(card.get("max_model_len")) else None)
                for card in data
            ]
            self._models_at = time.monotonic()
        except httpx.TransportError:
            self.lost()  # keep the list; callers treat None as "unknown"
        except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, TypeError):
            pass  # keep what we had; callers treat None as "unknown"
        return self._models

    async def _fetch_version(self) -> None:
        """vLLM's release, which decides how ``max_tokens`` is fitted. Unreachable, a 5xx (RunPod's edge while
        a pod restarts), a 401/403 or an answer that is not JSON: asked again with the next list. A JSON answer
        is final, and so is a 404 (an upstream without /version is not assumed to lower max_tokens)."""
        try:
            response = await self.client.get(f"{self.root}/version", headers=self.headers, timeout=self.listing_timeout)
            if response.status_code >= 500 or response.status_code in (401, 403):
                return
            version = orjson.loads(response.content).get("version") if response.status_code == 200 else None
        except (httpx.HTTPError, orjson.JSONDecodeError):
            return
        except AttributeError:
            version = None
        self.version = version if isinstance(version, str) else ""
        self.lowers_itself = lowers_max_tokens_itself(parse_version(self.version))

    async def resolve(self, requested: Any) -> ServedModel | None:
        """The served model a request names; None when the upstream's list is unknown (forward as is).

        Raises the 404 vLLM would, listing the served ids, when the name matches none of them.
        """
        if requested is not None and not isinstance(requested, str):
            raise UpstreamError(400, error_body("'model' must be a string", 400, param="model"))
        served = await self.models()
        if not served:
            return None
        if requested is None:
            return served[0] if len(served) == 1 else None
        found = match_model(requested, served)
        if found is None:
            served = await self.models(refresh=True) or served
            found = match_model(requested, served)
        if found is None:
            ids = ", ".join(m.id for m in served)
            raise UpstreamError(
                404,
                error_body(
                    f"The model `{requested}` does not exist. This server serves: {ids}",
                    404,
                    type="NotFoundError",
                    param="model",
                ),
            )
        return found

    # ----------------------------------------------------------------- context
    async def fit_context(self, body: dict[str, Any], model: ServedModel | None, body_bytes: int) -> dict[str, Any]:
        """``body``, or a copy with ``max_tokens`` lowered so the upstream accepts it (Kilo Code asks for 32000
        on every turn): capped at ``max_model_len`` for a vLLM that fits the rest itself, else bounded by what
        vLLM counted for the conversation's earlier turns, asking ``/tokenize`` only when that bound is too
        loose (``llmpod.proxy.context_fit``)."""
        limit = model.max_model_len if model else None
        return await fit(body, body_bytes, limit, self.lowers_itself, self.prompts, self.count_tokens)

    def learn(self, body: dict[str, Any], usage: dict[str, Any] | None) -> None:
        """Remember the prompt tokens vLLM reported for a forwarded ``body`` (only an older vLLM needs it)."""
        if not self.lowers_itself and usage is not None:
            self.prompts.learn(body, usage.get("prompt_tokens"))

    async def count_tokens(self, body: dict[str, Any]) -> int | None:
        """The prompt's tokens by vLLM's ``/tokenize`` (a chat's messages and tools, or a completion's prompt)."""
        request: dict[str, Any] = {"model": body.get("model")}
        if "messages" in body:
            request["messages"] = body.get("messages")
            # everything vLLM's chat template renders into the prompt (TokenizeChatRequest takes the same fields)
            request.update({field: body[field] for field in PROMPT_SHAPING_FIELDS if body.get(field) is not None})
        else:
            request["prompt"] = body.get("prompt")
        try:
            response = await self.client.post(
                f"{self.root}/tokenize",
                content=orjson.dumps(request),
                headers=self.headers,
                timeout=min(self.timeout, 30.0),
            )
            if response.status_code != 200:
                return None
            count = orjson.loads(response.content).get("count")
        except (httpx.HTTPError, orjson.JSONDecodeError, AttributeError):
            return None
        return count if is_int(count) else None

    # ----------------------------------------------------------------- generation
    async def open_stream(self, path: str, body: dict[str, Any]) -> UpstreamResponse:
        """POST ``body`` as a stream; the 200 response with its body not yet read.

        A 400 about the context is retried once with ``max_tokens`` lowered to what vLLM says fits.
        """
        response = await self._post_stream(path, body)
        if response.status == 400:
            content = await self._read_closing(response)
            error = self.rejected(400, content, response.headers)
            smaller = await self._refit(body, error.body["error"]["message"])
            if smaller is None:
                raise error
            response = await self._post_stream(path, smaller)
        if response.status != 200:
            content = await self._read_closing(response)
            raise self.rejected(response.status, content, response.headers)
        return response

    async def _refit(self, body: dict[str, Any], message: str) -> dict[str, Any] | None:
        refusal = refusal_from_error(message)
        if refusal is None:
            return None
        limit, prompt_tokens = refusal
        if prompt_tokens is None and not self.lowers_itself:
            prompt_tokens = await self.count_tokens(body)
        if prompt_tokens is None:
            return cap_max_tokens(body, limit) if self.lowers_itself else None
        self.prompts.learn(body, prompt_tokens)
        return cap_max_tokens(body, limit - prompt_tokens)

    async def _post_stream(self, path: str, body: dict[str, Any]) -> UpstreamResponse:
        assert self.pool is not None, "the app's lifespan opens the upstream pool"
        try:
            return await self.pool.post(self._base_path + path, orjson.dumps(body), self.headers)
        except UpstreamConnectionError as exc:
            self.lost()
            raise self.unreachable(exc) from None

    async def _read_closing(self, response: UpstreamResponse) -> bytes:
        try:
            return await response.read(MAX_ERROR_BODY)
        except UpstreamConnectionError:
            return b""
        finally:
            response.release()

    # ----------------------------------------------------------------- health
    async def probe(self) -> dict[str, Any]:
        """vLLM's readiness test: ``GET /health`` answers 200 (connection refused while loading)."""
        started = time.perf_counter()
        try:
            response = await self.client.get(f"{self.root}/health", timeout=min(self.timeout, 3.0))
        except httpx.HTTPError as exc:
            return {"url": self.root, "reachable": False, "error": self.unreachable(exc).args[0]}
        latency = round((time.perf_counter() - started) * 1000, 2)
        served = await self.models() if response.status_code == 200 else None
        result: dict[str, Any] = {
            "url": self.root,
            "reachable": True,
            "status_code": response.status_code,
            "latency_ms": latency,
            "models": [m.id for m in served or []],
            "kind": self.kind,
        }
        if response.status_code != 200:
            result["error"] = f"upstream /health answered HTTP {response.status_code}"
        return result
