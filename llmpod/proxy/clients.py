"""Which kind of client sent a request (``client_family``): the ``client`` of the per-client hit rates in /metrics.

A small ordered table of header patterns, first match wins; whatever matches none is ``other``. The set of
families is fixed, so the Prometheus ``client`` label can never grow with what clients send. The patterns
come from what the clients really send (tests/fixtures/clients, ../shared/reference/proxy_anchors.md §3).
"""

from __future__ import annotations

import re

OTHER = "other"

# (family, {header: pattern}): a row matches when every one of its headers matches (case-insensitive)
_TABLE: tuple[tuple[str, dict[str, str]], ...] = (
    # Kilo CLI 7.x: "Kilo-Code/7.7.7 ai-sdk/provider-utils/…"; the legacy 5.x extension "Kilo-Code/<ver>" and
    # X-Title "Kilo Code"
    ("kilo", {"user-agent": r"kilo-?code"}),
    ("kilo", {"x-title": r"^kilo code"}),
    # Roo Code: "RooCode/<ver>", X-Title "Roo Code"; Cline: X-Title "Cline" (its User-Agent is openai-node's)
    ("roo", {"user-agent": r"roo-?code|roo-cline"}),
    ("roo", {"x-title": r"^roo code"}),
    ("cline", {"user-agent": r"\bcline\b"}),
    ("cline", {"x-title": r"^cline\b"}),
    ("continue", {"user-agent": r"continue"}),
    # Continue CLI 1.5.47 bundles openai-node minified: openai-node's "<class name>/JS <version>" comes out as
    # "ls/JS 5.23.2" (the class name shortened to a few letters); openai-node itself says "OpenAI/JS"
    ("continue", {"user-agent": r"^(?!openai/)[a-z$_]{1,3}/js \d"}),
    # aider talks through litellm, which calls openai-python with raw responses: "OpenAI/Python 2.20.0" with
    # X-Stainless-Raw-Response: true (another litellm caller lands here too)
    ("aider", {"user-agent": r"aider|litellm"}),
    ("aider", {"user-agent": r"^openai/python", "x-stainless-raw-response": r"^true$"}),
    ("openai-python", {"user-agent": r"^openai/python"}),
    ("openai-node", {"user-agent": r"^openai/js"}),
    ("ai-sdk", {"user-agent": r"\bai-sdk/"}),
    ("curl", {"user-agent": r"^curl/"}),
)
RULES: tuple[tuple[str, tuple[tuple[bytes, re.Pattern[str]], ...]], ...] = tuple(
    (family, tuple((name.encode(), re.compile(pattern, re.IGNORECASE)) for name, pattern in headers.items()))
    for family, headers in _TABLE
)
FAMILIES: tuple[str, ...] = (*dict.fromkeys(family for family, _ in _TABLE), OTHER)
_HEADERS = frozenset(name for _, headers in RULES for name, _ in headers)
_KNOWN_MAX = 512  # distinct header combinations remembered (versions differ): bounded, cleared when full
_known: dict[tuple[tuple[bytes, bytes], ...], str] = {}
HEADER_CHARS = 512  # a longer header is looked at only this far: a pattern never runs over megabytes


def client_family(raw_headers: list[tuple[bytes, bytes]]) -> str:
    """The family of the client that sent these (ASGI, lower-case names) headers; ``other`` when none matches."""
    seen = tuple(sorted((name, value[:HEADER_CHARS]) for name, value in raw_headers if name in _HEADERS))
    family = _known.get(seen)
    if family is None:
        family = _classify(dict(seen))
        if len(_known) >= _KNOWN_MAX:
            _known.clear()
        _known[seen] = family
    return family


def _classify(headers: dict[bytes, bytes]) -> str:
    for family, patterns in RULES:
        if all(name in headers and pattern.search(headers[name].decode("latin-1")) for name, pattern in patterns):
            return family
    return OTHER
