"""Several models behind one proxy (issue 18): which backend answers a request.

``ModelRouter`` holds one ``Backend`` slot per configured model: its own ``Upstream`` (a stream pool to its
server, its model list, its server kind) and its ``BackendHealth``. A request names its model in the body (the id
or an alias), or in the path: ``/llm/{id}/v1/chat/completions`` and the FluidMCP guide's
``/llm/{id}/chat/completions`` go to ``{id}`` whatever the body says. Either way the body's ``model`` is rewritten
to what that server serves, and the cache key names the backend's id: ``/llm/{id}/`` and the plain route share
answers, and two backends serving the same upstream name never do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from llmpod.backends import Backend
from llmpod.errors import UpstreamError
from llmpod.proxy._http import HTTPPool
from llmpod.proxy.health import BackendHealth
from llmpod.proxy.settings import ProxySettings
from llmpod.proxy.upstream import ServedModel, Upstream, match_model, stream_pool
from llmpod.proxy.wire import error_body

MODEL_PREFIX = "/llm/"
# the path after ``/llm/{id}`` -> the generation route it means (the guide's form has no /v1)
MODEL_ROUTES = {
    "/v1/chat/completions": "/v1/chat/completions",
    "/chat/completions": "/v1/chat/completions",
    "/v1/completions": "/v1/completions",
    "/completions": "/v1/completions",
}
log = logging.getLogger("llmpod.proxy")
SCOPE_MODEL = "llmpod.model"  # the ASGI scope key naming the backend a /llm/{id}/ path chose


def split_model_path(path: str) -> tuple[str, str] | None:
    """``/llm/{id}/chat/completions`` -> (``id``, ``/v1/chat/completions``); None for any other path. An id may
    hold ``/`` (``Qwen/Qwen2.5-7B``): the route is recognised by its end."""
    if not path.startswith(MODEL_PREFIX):
        return None
    rest = path[len(MODEL_PREFIX) :]
    for suffix, route in MODEL_ROUTES.items():  # longest first: ``/v1/chat/completions`` before ``/completions``
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], route
    return None


@dataclass
class BackendSlot:
    backend: Backend
    upstream: Upstream
    pool: HTTPPool
    health: BackendHealth


class ModelRouter:
    """The configured backends, found by id or alias."""

    def __init__(self, settings: ProxySettings, client: httpx.AsyncClient) -> None:
        self.settings, self.client = settings, client
        self._retired: list[HTTPPool] = []  # pools of servers a model moved away from: closed at the end
        self.slots: dict[str, BackendSlot] = {}
        self._names: dict[str, str] = {}  # every id and alias -> id
        self._folded: dict[str, str] = {}  # the same, lowercased: ``Mock-GPT`` finds ``mock-gpt``
        for backend in settings.backends:
            pool = stream_pool(settings, backend.base_url)
            upstream = Upstream(settings, client, pool, backend)
            health = BackendHealth(backend, upstream, settings.health_interval)
            self.slots[backend.id] = BackendSlot(backend, upstream, pool, health)
            for name in (backend.id, *backend.aliases):
                self._names[name] = backend.id
                self._folded.setdefault(name.lower(), backend.id)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ids(self) -> list[str]:
        return list(self.slots)

    def get(self, model_id: str | None) -> BackendSlot | None:
        return self.slots.get(model_id) if model_id else None

    def find(self, name: str) -> BackendSlot | None:
        """The model a client's name means: an id or alias, any case; failing those, as with one upstream
        (``match_model``), the one model whose id, alias or server's name matches it (a Hugging Face repo id
        without its owner, or a short name whose parts are all in it)."""
        model_id = self._names.get(name) or self._folded.get(name.lower())
        if model_id is None:
            model_id = self._loosely(name)
        return self.slots[model_id] if model_id else None

    def _loosely(self, name: str) -> str | None:
        names = [(known, model_id) for known, model_id in self._names.items()]
        names += [(slot.backend.upstream_model, model_id) for model_id, slot in self.slots.items()]
        chosen = {model_id for known, model_id in names if match_model(name, [ServedModel(known, None)]) is not None}
        return chosen.pop() if len(chosen) == 1 else None  # two models match: ambiguous, the 404 lists them

    def unknown(self, name: str) -> UpstreamError:
        """vLLM's 404 for a model it does not serve, listing the ids this proxy routes."""
        message = f"The model `{name}` does not exist. This server serves: {', '.join(self.slots)}"
        return UpstreamError(404, error_body(message, 404, type="NotFoundError", param="model"))

    def follow(self, slot: BackendSlot) -> None:
        """A RunPod model's pod was replaced: its state file names the new pod's URL and key, and its requests go
        there from now on. No proxy restart: the other models' requests are never interrupted for it."""
        moved = slot.health.moved_to()
        if moved is None or moved.base_url is None:
            return
        backend = slot.backend.model_copy(update={"base_url": moved.base_url.rstrip("/"), "api_key": moved.api_key})
        self._retired.append(slot.pool)
        slot.pool = stream_pool(self.settings, backend.base_url)
        slot.upstream = Upstream(self.settings, self.client, slot.pool, backend)
        slot.backend = backend
        slot.health.moved(backend, slot.upstream)
        log.info("model %s is now served at %s", backend.id, backend.base_url)

    def pick(self, requested: Any, routed: str | None) -> BackendSlot:
        """The backend a request goes to: the path's ``{id}`` if it has one, else the body's model."""
        slot = self._pick(requested, routed)
        self.follow(slot)
        return slot

    def _pick(self, requested: Any, routed: str | None) -> BackendSlot:
        if routed is not None:
            slot = self.get(routed)
            if slot is None:
                raise self.unknown(routed)
            return slot
        if requested is not None and not isinstance(requested, str):
            raise UpstreamError(400, error_body("'model' must be a string", 400, param="model"))
        if requested is None:
            if len(self.slots) == 1:  # as vLLM: one model served, a body without one means it
                return next(iter(self.slots.values()))
            message = f"'model' is required: this server serves {', '.join(self.slots)}"
            raise UpstreamError(400, error_body(message, 400, param="model"))
        slot = self.find(requested)
        if slot is None:
            raise self.unknown(requested)
        return slot

    # ----------------------------------------------------------------- listing
    def card(self, slot: BackendSlot) -> dict[str, Any]:
        """The OpenAI model card of one backend, with its state (an extra field, which clients ignore)."""
        health = slot.health.current()
        card: dict[str, Any] = {
            "id": slot.backend.id,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "llmpod",
            "root": slot.backend.upstream_model,
            "state": health.state,
        }
        if slot.backend.aliases:
            card["aliases"] = list(slot.backend.aliases)
        known = {m.id: m for m in slot.upstream.known_models}
        served = known.get(slot.backend.upstream_model)
        if served is not None and served.max_model_len is not None:
            card["max_model_len"] = served.max_model_len
        return card

    def listing(self, only: BackendSlot | None = None) -> dict[str, Any]:
        slots = [only] if only is not None else list(self.slots.values())
        return {"object": "list", "data": [self.card(slot) for slot in slots]}

    # ----------------------------------------------------------------- lifetime
    def start(self) -> None:
        """Start probing every backend (the app's lifespan calls this, and ``aclose`` at its end)."""
        self._tasks = [
            asyncio.create_task(slot.health.run(lambda s=slot: self.follow(s)), name=f"health-{slot.backend.id}")  # type: ignore[misc]
            for slot in self.slots.values()
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in [*self._retired, *(slot.pool for slot in self.slots.values())]:
            await pool.aclose()
