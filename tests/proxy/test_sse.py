"""Parsing vLLM's server-sent events and assembling the plain answer from the chunks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from llmpod.proxy.sse import DONE, Assembler, SSEParser, is_usage_only

# A stream the way vLLM sends it, with a keep-alive comment and a two-line event thrown in.
STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b"data: first line\ndata: second line\n\n"
    b'data:{"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
STREAM_EVENTS = [
    b'{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
    b'{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}',
    b"first line\nsecond line",
    b'{"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}',
    b"[DONE]",
]


# --------------------------------------------------------------------------------------------- helpers
def parse(pieces: Iterable[bytes]) -> list[bytes]:
    parser = SSEParser()
    events: list[bytes] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


HEAD: dict[str, Any] = {
    "id": "chatcmpl-42",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "qwen-7b",
}


def chat_chunk(
    delta: dict[str, Any] | None = None,
    *,
    index: int = 0,
    finish_reason: str | None = None,
    stop_reason: Any = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta or {},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return {**HEAD, "choices": [choice]}


def usage_chunk(prompt: int = 7, completion: int = 3) -> dict[str, Any]:
    return {
        **HEAD,
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def text_chunk(text: str, *, index: int = 0, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-7",
        "object": "text_completion",
        "created": 1700000001,
        "model": "qwen-7b",
        "choices": [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        ],
    }


def assemble(chunks: Iterable[dict[str, Any]], endpoint: str = "chat.completions") -> Assembler:
    assembler = Assembler(endpoint)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler


def token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}


# --------------------------------------------------------------------------------------------- parser
def test_parser_returns_each_events_data() -> None:
    assert parse([STREAM]) == STREAM_EVENTS


def test_parser_one_byte_at_a_time_gives_the_same_events() -> None:
    assert parse(one_byte_at_a_time(STREAM)) == STREAM_EVENTS


def test_parser_split_anywhere_gives_the_same_events() -> None:
    wrong = [cut for cut in range(1, len(STREAM)) if parse([STREAM[:cut], STREAM[cut:]]) != STREAM_EVENTS]
    assert wrong == []


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_parser_accepts_lf_crlf_and_cr_line_ends(line_end: bytes, bytewise: bool) -> None:
    stream = STREAM.replace(b"\n", line_end)
    pieces = one_byte_at_a_time(stream) if bytewise else [stream]
    assert parse(pieces) == STREAM_EVENTS


def test_parser_dispatches_a_cr_terminated_event_without_waiting_for_more_bytes() -> None:
    # With CR line ends, the blank line that ends an event is a lone CR; the event (and the final [DONE])
    # must come out as soon as it arrives, not only when the next read shows that no LF follows.
    parser = SSEParser()
    assert parser.feed(b"data: a\r\r") == [b"a"]
    assert parser.feed(b"data: [DONE]\r\r") == [DONE]


def test_parser_crlf_split_between_two_reads_is_one_line_end() -> None:
    # Were the CR and the LF taken as two line ends, the blank line between them would end the event
    # early and split "a" and "b" into two events.
    assert parse([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [b"a\nb"]


def test_parser_crlf_split_inside_the_blank_line() -> None:
    # the LF completing the blank line's CRLF must not count as a second (empty) line of the next event
    assert parse([b"data: x\r\n\r", b"\ndata: y\r\n\r\n"]) == [b"x", b"y"]
    assert parse([b"data: x\r\n\r", b"\n", b"data: y\r\n\r\n"]) == [b"x", b"y"]


def test_parser_ignores_comments() -> None:
    stream = b": keep-alive\n\ndata: a\n: comment inside an event\ndata: b\n\n:\n\n"
    assert parse([stream]) == [b"a\nb"]


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b"data: x", b"x"),
        (b"data:x", b"x"),
        (b"data:  x", b" x"),  # only the one space after the colon goes
        (b"data: ", b""),
    ],
)
def test_parser_strips_one_optional_space_after_data(line: bytes, data: bytes) -> None:
    assert parse([line + b"\n\n"]) == [data]


def test_parser_ignores_other_fields() -> None:
    assert parse([b"event: message\nid: 7\nretry: 100\ndata: x\n\nevent: ping\n\n"]) == [b"x"]


def test_parser_returns_done_as_data() -> None:
    assert parse([b"data: [DONE]\n\n"]) == [DONE]
    assert DONE == b"[DONE]"


def test_parser_waits_for_the_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\n") == []
    assert parser.feed(b"\n") == [b"x"]


@pytest.mark.parametrize(
    "fed",
    [
        b'data: {"id":"c1","choi',
        b"data: x\n",
        b"data: x\r\n",
        b"data: x\ndata: y",
    ],
)
def test_parser_pending_for_an_unfinished_event(fed: bytes) -> None:
    parser = SSEParser()
    parser.feed(fed)
    assert parser.pending is True


@pytest.mark.parametrize("fed", [b"", b"data: x\n\n", b"data: x\r\n\r\n", b": keep-alive\n\n", STREAM])
def test_parser_not_pending_between_events(fed: bytes) -> None:
    parser = SSEParser()
    parser.feed(fed)
    assert parser.pending is False


# --------------------------------------------------------------------------------------------- is_usage_only
def test_the_include_usage_chunk_is_usage_only() -> None:
    assert is_usage_only(usage_chunk()) is True


@pytest.mark.parametrize(
    "chunk",
    [
        chat_chunk({"content": "x"}),
        {**chat_chunk({"content": "x"}), "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
        {**HEAD, "choices": []},
        {**HEAD, "choices": [], "usage": None},
    ],
)
def test_other_chunks_are_not_usage_only(chunk: dict[str, Any]) -> None:
    assert is_usage_only(chunk) is False


# --------------------------------------------------------------------------------------------- chat assembly
def test_chat_content_is_joined_into_one_message() -> None:
    assembler = assemble(
        [
            chat_chunk({"role": "assistant", "content": ""}),
            chat_chunk({"content": "Hel"}),
            chat_chunk({"content": "lo, "}),
            chat_chunk({"content": "world"}),
            chat_chunk({}, finish_reason="stop", stop_reason="###"),
            usage_chunk(prompt=7, completion=3),
        ]
    )

    result = assembler.result()

    assert result["id"] == "chatcmpl-42"
    assert result["object"] == "chat.completion"
    assert result["created"] == 1700000000
    assert result["model"] == "qwen-7b"
    assert result["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    [choice] = result["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hello, world"
    assert "tool_calls" not in choice["message"]  # vLLM 0.33 leaves an empty list out (golden chat_plain)
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "###"
    assert assembler.complete is True
    assert assembler.completion_tokens == 3


def test_chat_length_finish_is_kept() -> None:
    result = assemble([chat_chunk({"content": "cut"}, finish_reason="length")]).result()
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["choices"][0]["stop_reason"] is None


def test_assembled_answer_is_json_serialisable() -> None:
    result = assemble([chat_chunk({"content": "x"}, finish_reason="stop"), usage_chunk()]).result()
    assert orjson.loads(orjson.dumps(result)) == result


def test_tool_call_arguments_are_joined() -> None:
    assembler = assemble(
        [
            chat_chunk({"role": "assistant", "content": None}),
            chat_chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_abc",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            chat_chunk({}, finish_reason="tool_calls"),
            usage_chunk(completion=12),
        ]
    )

    [choice] = assembler.result()["choices"]

    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]
    assert choice["finish_reason"] == "tool_calls"
    assert assembler.complete is True
    assert assembler.completion_tokens == 12


def test_parallel_tool_calls_stay_separate_and_in_order() -> None:
    result = assemble(
        [
            chat_chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "a", "arguments": ""}}
                    ]
                }
            ),
            chat_chunk(
                {
                    "tool_calls": [
                        {"index": 1, "id": "call_1", "type": "function", "function": {"name": "b", "arguments": ""}}
                    ]
                }
            ),
            chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"y": 2}'}}]}),
            chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": 1}'}}]}),
            chat_chunk({}, finish_reason="tool_calls"),
        ]
    ).result()

    calls = result["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_0", "a", '{"x": 1}'),
        ("call_1", "b", '{"y": 2}'),
    ]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_is_joined_under_its_own_field(field: str) -> None:
    assembler = assemble(
        [
            chat_chunk({"role": "assistant", "content": ""}),
            chat_chunk({field: "Two plus "}),
            chat_chunk({field: "two is four."}),
            chat_chunk({"content": "4"}),
            chat_chunk({}, finish_reason="stop"),
        ]
    )

    message = assembler.result()["choices"][0]["message"]

    assert message[field] == "Two plus two is four."
    assert message["content"] == "4"
    other = "reasoning_content" if field == "reasoning" else "reasoning"
    assert other not in message
    assert assembler.complete is True


def test_chat_logprobs_are_concatenated() -> None:
    first = [token("Hel", -0.1)]
    second = [token("lo", -0.2), token("!", -1.5)]
    result = assemble(
        [
            chat_chunk({"role": "assistant", "content": ""}),
            chat_chunk({"content": "Hel"}, logprobs={"content": first}),
            chat_chunk({"content": "lo!"}, logprobs={"content": second}),
            chat_chunk({}, finish_reason="stop"),
        ]
    ).result()

    assert result["choices"][0]["logprobs"]["content"] == first + second


def test_two_interleaved_choices_are_assembled_per_index() -> None:
    assembler = assemble(
        [
            chat_chunk({"role": "assistant", "content": ""}, index=0),
            chat_chunk({"role": "assistant", "content": ""}, index=1),
            chat_chunk({"content": "Red "}, index=1),
            chat_chunk({"content": "Blue "}, index=0),
            chat_chunk({"content": "sky"}, index=0),
            chat_chunk({"content": "rose"}, index=1),
            chat_chunk({}, index=1, finish_reason="length"),
            chat_chunk({}, index=0, finish_reason="stop"),
            usage_chunk(completion=4),
        ]
    )

    choices = assembler.result()["choices"]

    assert [c["index"] for c in choices] == [0, 1]
    assert [c["message"]["content"] for c in choices] == ["Blue sky", "Red rose"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]
    assert assembler.complete is True


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([], id="no chunks"),
        pytest.param([chat_chunk({"content": "cut off"})], id="no finish_reason"),
        pytest.param([chat_chunk({"content": "partial"}), chat_chunk({}, finish_reason="abort")], id="aborted"),
        pytest.param([chat_chunk({"content": "partial"}), chat_chunk({}, finish_reason="error")], id="errored"),
        pytest.param(
            [chat_chunk({"role": "assistant", "content": ""}), chat_chunk({}, finish_reason="stop")],
            id="nothing produced",
        ),
        pytest.param(
            [chat_chunk({"role": "assistant", "content": "", "reasoning": ""}), chat_chunk({}, finish_reason="stop")],
            id="only empty reasoning",
        ),
        pytest.param(
            [
                chat_chunk({"content": "done"}, index=0, finish_reason="stop"),
                chat_chunk({"content": "still going"}, index=1),
            ],
            id="second choice unfinished",
        ),
        pytest.param(
            [
                chat_chunk({"content": "done"}, index=0, finish_reason="stop"),
                chat_chunk({"content": ""}, index=1, finish_reason="stop"),
            ],
            id="second choice empty",
        ),
    ],
)
def test_incomplete_answers_are_not_complete(chunks: list[dict[str, Any]]) -> None:
    assert assemble(chunks).complete is False


def test_completion_tokens_without_usage_is_zero() -> None:
    assert assemble([chat_chunk({"content": "x"}, finish_reason="stop")]).completion_tokens == 0


# --------------------------------------------------------------------------------------------- text completions
def test_text_completion_pieces_are_joined() -> None:
    assembler = assemble(
        [
            text_chunk("Once "),
            text_chunk("upon "),
            text_chunk("a time", finish_reason="length"),
            {
                "id": "cmpl-7",
                "object": "text_completion",
                "created": 1700000001,
                "model": "qwen-7b",
                "choices": [],
                "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
            },
        ],
        endpoint="completions",
    )

    result = assembler.result()

    assert result["object"] == "text_completion"
    assert result["id"] == "cmpl-7"
    [choice] = result["choices"]
    assert choice["text"] == "Once upon a time"
    assert "message" not in choice
    assert choice["finish_reason"] == "length"
    assert assembler.complete is True
    assert assembler.completion_tokens == 3


# --------------------------------------------------------------------------------------------- together
def test_a_byte_stream_parses_and_assembles_into_the_answer() -> None:
    chunks = [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "Bonjour"}),
        chat_chunk({"content": " !"}, finish_reason="stop"),
        usage_chunk(completion=2),
    ]
    wire = b"".join(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n" for chunk in chunks) + b"data: [DONE]\r\n\r\n"
    assembler = Assembler("chat.completions")
    usage_seen = []

    for data in parse(one_byte_at_a_time(wire)):
        if data == DONE:
            break
        chunk = orjson.loads(data)
        usage_seen.append(is_usage_only(chunk))
        assembler.add(chunk)

    assert usage_seen == [False, False, False, True]
    assert assembler.result()["choices"][0]["message"]["content"] == "Bonjour !"
    assert assembler.complete is True
    assert assembler.completion_tokens == 2
