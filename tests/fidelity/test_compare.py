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


def _index(answer: Answer, test: Callable[[Any], bool]) -> int:
    return next(i for i, event in enumerate(answer["events"]) if test(event))


def _repeat(test: Callable[[Any], bool]) -> Callable[[Answer], None]:
    def mutate(answer: Answer) -> None:
        i = _index(answer, test)
        answer["events"].insert(i, answer["events"][i])

    return mutate


def _finishes(event: Any) -> bool:
    return isinstance(event, dict) and any(c["finish_reason"] for c in event["choices"])


def _has_usage(event: Any) -> bool:
    return isinstance(event, dict) and bool(event.get("usage"))


def _has_role(event: Any) -> bool:
    return isinstance(event, dict) and any("role" in c.get("delta", {}) for c in event["choices"])


def _calls(event: Any) -> list[dict[str, Any]]:
    return [call for c in event["choices"] for call in c.get("delta", {}).get("tool_calls") or []]


def _names_a_tool(event: Any) -> bool:
    return isinstance(event, dict) and any("id" in call for call in _calls(event))


@pytest.mark.parametrize(
    ("name", "test"),
    [
        ("chat_stream_usage", _finishes),
        ("chat_stream_usage", _has_usage),
        ("chat_stream", _has_role),
        ("completion_stream_usage", _finishes),
        ("completion_stream_usage", _has_usage),
        ("tools_call_stream", _names_a_tool),
        ("tools_call_stream", _finishes),
        ("chat_stream", lambda event: event == "[DONE]"),
    ],
    ids=[
        "chat finish",
        "chat usage",
        "chat role",
        "completion finish",
        "completion usage",
        "tool call",
        "tool finish",
        "done",
    ],
)
def test_a_repeated_chunk_other_than_a_text_piece_is_reported(name: str, test: Callable[[Any], bool]) -> None:
    found = _compare(name, _repeat(test))
    assert len(found) == 1 and found[0].startswith("$.events: "), found


def test_a_text_piece_repeated_or_cut_differently_is_not_reported() -> None:
    # The number of pieces depends on the tokenizer, which the stub engine and the mock do not share.
    assert _compare("chat_stream", _repeat(lambda e: not _has_role(e) and not _finishes(e))) == []
    assert _compare("completion_stream", _repeat(lambda e: not _finishes(e))) == []


def _usage(answer: Answer) -> dict[str, Any]:
    return answer["json"]["usage"] if "json" in answer else answer["events"][_index(answer, _has_usage)]["usage"]


def _set(**values: Any) -> Callable[[Answer], None]:
    return lambda answer: _usage(answer).update(values)


@pytest.mark.parametrize("name", ["chat_plain", "chat_stream_usage", "completion_plain", "completion_stream_usage"])
def test_a_wrong_usage_is_reported(name: str) -> None:
    def no_completion(answer: Answer) -> None:
        usage = _usage(answer)
        usage.update(completion_tokens=0, total_tokens=usage["prompt_tokens"])

    def wrong_total(answer: Answer) -> None:
        _usage(answer)["total_tokens"] += 1

    found = _compare(name, no_completion)
    assert len(found) == 1 and ".usage.completion_tokens: vLLM '<int > 0>', mock 0" in found[0], found
    found = _compare(name, wrong_total)
    assert len(found) == 1 and ".usage.total_tokens: vLLM '<prompt + completion>'" in found[0], found
    assert "not prompt + completion" in found[0]
    found = _compare(name, lambda answer: _usage(answer).pop("total_tokens"))
    assert len(found) == 1 and ".usage.total_tokens: missing" in found[0], found


def test_usage_details_must_have_vllms_shape() -> None:
    assert _compare("chat_plain", _set(prompt_tokens_details={"cached_tokens": 0})) == [
        "$.json.usage.prompt_tokens_details: vLLM None, mock {'cached_tokens': 0}"
    ]


def test_other_token_counts_that_add_up_are_not_reported() -> None:
    # The stub's tokenizer is not the mock's: the values themselves may differ.
    assert _compare("chat_plain", _set(prompt_tokens=5, completion_tokens=4, total_tokens=9)) == []
    assert _compare("tools_call_stream_usage", _set(prompt_tokens=16, completion_tokens=10, total_tokens=26)) == []


def _stream_arguments(*pieces: str) -> Callable[[Answer], None]:
    """The tool call's arguments streamed as ``pieces`` (one chunk each) instead of vLLM's."""

    def mutate(answer: Answer) -> None:
        i = _index(answer, lambda e: isinstance(e, dict) and any("arguments" in c["function"] for c in _calls(e)))
        chunk = answer["events"].pop(i)
        for offset, piece in enumerate(pieces):
            one = copy.deepcopy(chunk)
            _calls(one)[0]["function"]["arguments"] = piece
            answer["events"].insert(i + offset, one)

    return mutate


@pytest.mark.parametrize("name", ["tools_call_stream", "tools_call_stream_usage"])
def test_streamed_arguments_must_join_into_a_json_object(name: str) -> None:
    assert _compare(name, _stream_arguments('{"city":', ' "Paris"}')) == []
    assert _compare(name, _stream_arguments('{"city":', ' "Paris"')) == [
        "$.streamed arguments.choice 0 call 0: vLLM '<arguments: JSON object>', mock '<arguments: not JSON>'"
    ]
    assert _compare(name, _stream_arguments("[", "]")) == [
        "$.streamed arguments.choice 0 call 0: vLLM '<arguments: JSON object>', mock '<arguments: not an object>'"
    ]


def test_whole_arguments_must_be_a_json_object() -> None:
    def not_json(answer: Answer) -> None:
        answer["json"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"city": '

    assert _compare("tools_call", not_json) == [
        "$.json.choices[0].message.tool_calls[0].function.arguments: vLLM '<arguments: JSON object>', "
        "mock '<arguments: not JSON>'"
    ]


@pytest.mark.parametrize("name", ["chat_too_long", "chat_too_long_stream", "completion_too_long"])
@pytest.mark.parametrize(("said", "wrong"), [("is 1024 tokens", "is 2048 tokens"), ("at least 1025", "at least 1500")])
def test_the_numbers_vllm_states_in_a_message_are_compared(name: str, said: str, wrong: str) -> None:
    def mutate(answer: Answer) -> None:
        error = answer["json"]["error"]
        assert said in error["message"]
        error["message"] = error["message"].replace(said, wrong)

    found = _compare(name, mutate)
    assert len(found) == 1 and found[0].startswith("$.json.error.message: ") and wrong in found[0], found


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
