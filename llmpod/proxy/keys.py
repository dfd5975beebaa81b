"""Cache keys: the SHA-256 of a canonical JSON (sorted keys, no whitespace) of the endpoint, the kind of server
that answers (``mock`` or ``vllm``, llmpod/server_kind.py) and the request as forwarded, minus the fields that
cannot change the answer (``NON_KEY_FIELDS``).

The kind is there because the mock and a real pod serve the same model id: without it, the answers cached while
trying ``--local`` were served for the real pod. Nothing that changes when a pod is replaced (its id, URL, port,
start time) is in the key: a new pod of the same kind and model finds the answers of the one before. Keys written
before the kind was in them (no ``kind`` in their files) never match a new key: they are not served, and age out."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

# Transport and bookkeeping fields: the same question with or without them gets the same answer.
# ``stream``/``stream_options`` are here so a streamed and a plain request share one entry; ``cache`` is
# LiteLLM's per-request control object; ``user``, ``metadata``, ``store`` and ``request_id`` only label.
NON_KEY_FIELDS = frozenset({"stream", "stream_options", "user", "cache", "metadata", "store", "request_id"})
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}\Z")


class UnkeyableRequest(ValueError):
    """A request that cannot be written as canonical JSON: nested deeper than orjson writes (it reads deeper)."""


def cache_key(endpoint: str, body: dict[str, Any], kind: str) -> str:
    """The hex SHA-256 that names the answer to ``body`` on ``endpoint`` (``chat.completions``…) from a server
    of ``kind``."""
    request = {}
    for name, value in body.items():
        if name in NON_KEY_FIELDS:
            continue
        # 0 and 0.0 sample the same way; JSON clients differ in which they send
        if type(value) is float and value.is_integer() and abs(value) < 2**63:
            value = int(value)
        request[name] = value
    try:
        canonical = orjson.dumps({"endpoint": endpoint, "kind": kind, "request": request}, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        raise UnkeyableRequest("request body is nested too deeply") from None
    return hashlib.sha256(canonical).hexdigest()
