"""Which kind of server answers: our mock (``llmpod.mock``) or a real vLLM. Shared by the three packages.

The proxy keys every cached answer by it (llmpod/proxy/keys.py), so the mock's answers to a model id are never
served for a real pod serving the same id (``manage_pod.py --local`` then RunPod, one cache directory), nor a
pod's for the mock. The mock says what it is in a response header on every answer; a real vLLM sends no such
header, so an answer without it is vLLM's. A header, not a JSON field: clients (and the fidelity tier, which
compares the mock's bodies and recorded headers with vLLM's own) see exactly vLLM's shapes.

The pod manager also tells the proxy which kind it started (``UPSTREAM_KIND``, llmpod/proxy_settings.py):
the bundled mock for ``--local``, vLLM for a RunPod pod. The header, when the proxy sees an answer, wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

KIND_HEADER = "x-llmpod-kind"  # the mock's mark, with its kind as the value
MOCK: Final = "mock"
VLLM: Final = "vllm"
# the kinds a setting may name; a new one (another mock, another engine) is added here and marks itself
KINDS = (MOCK, VLLM)
ServerKind = Literal["mock", "vllm"]
_TOKEN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}\Z")


def kind_of(headers: Mapping[str, str]) -> str | None:
    """The kind an upstream's answer says it came from: the header's value, vLLM without one, None (unknown)
    for a header whose value is not a short lower-case name (never trusted into a cache key as it is)."""
    value = headers.get(KIND_HEADER)
    if value is None:
        return VLLM
    value = value.strip().lower()
    return value if _TOKEN.match(value) else None
