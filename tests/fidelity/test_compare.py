"""The comparison itself: a wrong answer fed through it (vLLM's golden answer, mutated) is reported, and what it
masks on purpose (text, how a tokenizer cuts it, token counts' values) is not."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.fidelity.__main__ import load_golden, stale
from tests.fidelity.compare import differences, normalize
from tests.fidelity.corpus import CASES, Case

Answer = dict[str, Any]


def _case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def _compare(name: str, mutate: Callable[[Answer], object]) -> list[str]:
    """The differences between vLLM's recorded answer to ``name`` and that answer changed by ``mutate``."""
    case = _case(name)
    golden = load_golden(case)
    wrong = copy.deepcopy(golden)
    mutate(wrong)
    return differences(normalize(golden, case), normalize(wrong, case))


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("key_models_right", {"headers": {}}),
        ("key_no_scheme", {"headers": {"Authorization": "Bearer fidelity-key"}}),
        ("chat_plain", {"body": {"model": "my-model", "messages": [{"role": "user", "content": "Hi"}]}}),
        ("chat_bad_json", {"raw": b"{"}),
        ("chat_not_json_content_type", {"content_type": "application/json"}),
        ("key_chat_right", {"method": "PUT"}),
        ("tools_call", {"server": "plain"}),
    ],
)
def test_a_golden_file_recorded_for_another_request_is_stale(name: str, change: dict[str, Any]) -> None:
    case = _case(name)
    golden = load_golden(case)
    assert stale(case, golden) == []
    found = stale(dataclasses.replace(case, **change), golden)
    assert len(found) == 1 and found[0].startswith("$.request: recorded ") and "re-record" in found[0], found


def test_a_golden_file_without_the_request_headers_is_stale() -> None:
    case = _case("key_models_wrong")
    golden = load_golden(case)
    golden["request"] = {k: v for k, v in golden["request"].items() if k != "headers"}
    assert stale(case, golden) and json.dumps(case.request()["headers"]) == '{"Authorization": "Bearer wrong"}'
