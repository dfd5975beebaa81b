"""The mock's tool calls: the arguments fit the tool's JSON schema, and an agent that runs them harms nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from llmpod.mock import MockSettings, create_app
from llmpod.mock.tokens import message_text
from llmpod.mock.tool_arguments import arguments
from llmpod.mock.tools import call_id, pick_tool


def tool(name: str, properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    wanted = required if required is not None else list(properties)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": name,
            "parameters": {"type": "object", "properties": properties, "required": wanted},
        },
    }


# Shaped like the tools an agent (Kilo Code, Continue) sends on every turn.
AGENT_TOOLS = [
    tool("execute_command", {"command": {"type": "string"}, "cwd": {"type": ["string", "null"]}}),
    tool(
        "write_to_file",
        {"path": {"type": "string"}, "content": {"type": "string"}, "line_count": {"type": "integer", "minimum": 0}},
    ),
    tool("apply_diff", {"path": {"type": "string"}, "diff": {"type": "string"}}),
    tool(
        "read_file",
        {
            "files": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string"},
                        "line_ranges": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["path"],
                    "additionalProperties": False,
                },
            }
        },
    ),
    tool("list_files", {"path": {"type": "string"}, "recursive": {"type": "boolean"}}),
    tool(
        "search_files",
        {
            "path": {"type": "string"},
            "regex": {"type": "string", "minLength": 1},
            "file_pattern": {"type": ["string", "null"]},
        },
    ),
    tool(
        "ask_followup_question",
        {
            "question": {"type": "string"},
            "follow_up": {
                "type": "array",
                "minItems": 2,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}, "mode": {"type": ["string", "null"]}},
                    "required": ["text", "mode"],
                },
            },
        },
    ),
    tool("attempt_completion", {"result": {"type": "string"}}),
    tool(
        "switch_mode",
        {"mode_slug": {"type": "string", "enum": ["code", "architect", "ask"]}, "reason": {"type": "string"}},
    ),
]

ODD_SCHEMAS = [
    tool(
        "nested",
        {
            "config": {
                "type": "object",
                "properties": {
                    "depth": {"type": "integer", "minimum": 3, "maximum": 9},
                    "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}},
                    "unit": {"const": "cm"},
                },
                "required": ["depth", "ratio", "tags", "unit"],
            }
        },
    ),
    tool(
        "defaults",
        {
            "limit": {"type": "integer", "default": 50},
            "verbose": {"type": "boolean", "default": True},
            "name": {"type": "string", "minLength": 12},
        },
        required=["name"],
    ),
    tool(
        "unions",
        {
            "target": {"anyOf": [{"type": "null"}, {"type": "string", "format": "uri"}]},
            "when": {"type": "string", "format": "date-time"},
            "choice": {"oneOf": [{"type": "integer", "maximum": -5}, {"type": "string"}]},
        },
    ),
    tool("no_parameters", {}, required=[]),
]


@pytest.mark.parametrize("candidate", AGENT_TOOLS + ODD_SCHEMAS, ids=lambda t: t["function"]["name"])
def test_arguments_are_valid_against_the_schema(candidate: dict[str, Any]) -> None:
    args = arguments(candidate)
    schema = candidate["function"]["parameters"]
    assert jsonschema_rs.validator_for(schema).is_valid(args), (args, schema)
    assert set(schema.get("required", [])) <= set(args)


def test_defaults_are_used_and_optional_fields_left_out() -> None:
    assert arguments(ODD_SCHEMAS[1]) == {"name": "mockmockmock", "limit": 50, "verbose": True}
    assert arguments(tool("opt", {"path": {"type": "string"}}, required=[])) == {}


def test_arguments_are_harmless() -> None:
    by_name = {t["function"]["name"]: arguments(t) for t in AGENT_TOOLS}
    assert by_name["read_file"] == {"files": [{"path": "README.md"}]}
    assert by_name["list_files"] == {"path": ".", "recursive": False}
    assert by_name["search_files"]["path"] == "." and by_name["execute_command"]["command"].startswith("echo ")
    # a forced write goes to ".", which no tool can write as a file, with nothing to write: it fails harmlessly
    assert by_name["write_to_file"]["path"] == "." and by_name["write_to_file"]["content"] == ""
    assert by_name["apply_diff"] == {"path": ".", "diff": ""}
    assert by_name["switch_mode"]["mode_slug"] == "ask"  # of its enum, the value that only looks


USER = [{"role": "user", "content": "Fix the bug in main.py"}]


@pytest.mark.parametrize(
    ("text", "choice", "expected"),
    [
        ("Fix the bug in main.py", "auto", None),  # nothing says to call a tool: words
        ("Use a tool to look around", "auto", "read_file"),  # the first read-only tool, never a write
        ("Please call attempt_completion when done", "auto", "attempt_completion"),
        ("use write_to_file or read_file", "auto", "read_file"),  # of the named ones, the safest
        ("Fix the bug", "required", "read_file"),
        ("Fix the bug", {"type": "function", "function": {"name": "execute_command"}}, "execute_command"),
        ("use read_file", "none", None),
    ],
)
def test_the_mock_prefers_read_only_tools(text: str, choice: Any, expected: str | None) -> None:
    messages = [{"role": "user", "content": text}]
    picked = pick_tool(AGENT_TOOLS, choice, messages, text)
    assert (picked["function"]["name"] if picked else None) == expected


def test_after_a_tool_result_the_model_answers_in_words() -> None:
    messages = [*USER, {"role": "tool", "tool_call_id": "x", "content": "file contents"}]
    assert pick_tool(AGENT_TOOLS, "auto", messages, "use read_file") is None


def test_a_tool_set_without_a_safe_tool_gets_words_unless_named() -> None:
    risky = AGENT_TOOLS[:3]
    assert pick_tool(risky, "auto", [{"role": "user", "content": "use a tool"}], "use a tool") is None
    assert pick_tool(risky, "required", USER, "x")["function"]["name"] == "execute_command"


def test_call_ids_follow_the_parser() -> None:
    assert call_id("hermes", "f").startswith("chatcmpl-tool-") and len(call_id(None, "f")) == 30
    assert call_id("kimi_k2", "read_file") == "functions.read_file:0"
    mistral = call_id("mistral", "f")
    assert len(mistral) == 9 and mistral.isalnum()


async def test_an_agent_turn_gets_a_valid_harmless_call_through_the_server() -> None:
    settings = MockSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
    body = {
        "messages": [{"role": "user", "content": "Use your tools to explore the repository"}],
        "tools": AGENT_TOOLS,
        "tool_choice": "auto",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 4096,
    }
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        response = await client.post("/v1/chat/completions", json=body)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    calls = [c for e in events for ch in e["choices"] for c in ch["delta"].get("tool_calls") or []]
    assert calls[0]["function"] == {"name": "read_file"}
    args = json.loads("".join(c["function"].get("arguments", "") for c in calls))
    assert args == {"files": [{"path": "README.md"}]}
    assert [ch["finish_reason"] for e in events for ch in e["choices"]][-1] == "tool_calls"


# ------------------------------------------------------------------------ the tools real clients send

FIXTURES = Path(__file__).parents[1] / "fixtures" / "clients"
# Read from each recorded tool's description: these write or edit files, run commands, start background processes
# or subagents, post to a board, schedule or cancel wakeups, replace the todo list or end the session. An agent in
# `manage_pod.py --local` runs what the mock calls, in the user's repository.
CHANGING = {
    "background_process",
    "bash",
    "board_post",
    "cancel_wakeup",
    "edit",
    "schedule_wakeup",
    "task",
    "todowrite",
    "write",
    "Bash",
    "Checklist",
    "Edit",
    "Exit",
    "Write",
}
LOOKING = {
    "board_read",
    "glob",
    "grep",
    "kilo_local_recall",
    "read",
    "skill",
    "webfetch",
    "AskQuestion",
    "CheckBackgroundJob",
    "Fetch",
    "List",
    "Read",
    "Skills",
}
READS = {"read", "Read"}  # may be given an existing file to read
MESSAGES = ["write hello.py", "edit the config", "use bash to run tests", "call write", "use task", "use Checklist"]


def recorded_tool_sets() -> dict[str, list[dict[str, Any]]]:
    """Each distinct tool list in the recorded client turns, by the first fixture that sent it."""
    sets: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(FIXTURES.glob("*.json")):
        tools = json.loads(path.read_text())["body"].get("tools")
        names = [t["function"]["name"] for t in tools or []]
        if tools and all([t["function"]["name"] for t in seen] != names for seen in sets.values()):
            sets[path.stem] = tools
    return sets


TOOL_SETS = recorded_tool_sets()
RECORDED_MESSAGES = {
    stem: message_text(
        [m for m in json.loads((FIXTURES / f"{stem}.json").read_text())["body"]["messages"] if m["role"] == "user"][-1]
    )
    for stem in TOOL_SETS
}


def test_the_recorded_tools_are_kilos_and_continues_and_all_classified() -> None:
    assert sorted(len(tools) for tools in TOOL_SETS.values()) == [11, 16]  # Continue's 11, Kilo's 16
    names = {t["function"]["name"] for tools in TOOL_SETS.values() for t in tools}
    assert names == CHANGING | LOOKING and not CHANGING & LOOKING  # a newly recorded tool must be classified here


def strings(value: Any, key: str = "") -> list[tuple[str, str]]:
    """Every (field name, string) in generated arguments, nested ones included."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in strings(v, k)]
    if isinstance(value, list):
        return [pair for v in value for pair in strings(v, key)]
    return [(key, value)] if isinstance(value, str) else []


def assert_valid_and_harmless(tool: dict[str, Any], args: dict[str, Any]) -> None:
    name, schema = tool["function"]["name"], tool["function"]["parameters"]
    assert jsonschema_rs.validator_for(schema).is_valid(args), (name, args)
    for key, value in strings(args):
        field = key.lower()
        if field.endswith(("path", "file", "dir", "directory", "folder")) or field in ("cwd", "workdir"):
            assert value == "." or (name in READS and value == "README.md"), (name, key, value)
        if field in ("command", "cmd", "script"):
            assert value == "true" or re.fullmatch(r"echo [\w .]*", value), (name, key, value)


@pytest.mark.parametrize("stem", TOOL_SETS)
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_mock_never_picks_a_changing_recorded_tool_on_its_own(stem: str, choice: str) -> None:
    tools = TOOL_SETS[stem]
    for text in [*MESSAGES, RECORDED_MESSAGES[stem]]:
        picked = pick_tool(tools, choice, [{"role": "user", "content": text}], text.lower())
        assert picked is None or picked["function"]["name"] not in CHANGING, (text, picked["function"]["name"])
        if picked is not None:
            assert_valid_and_harmless(picked, arguments(picked))


@pytest.mark.parametrize(
    "tool", [t for tools in TOOL_SETS.values() for t in tools], ids=lambda t: str(t["function"]["name"])
)
def test_a_forced_recorded_tool_gets_valid_arguments_that_harm_nothing(tool: dict[str, Any]) -> None:
    named = {"type": "function", "function": {"name": tool["function"]["name"]}}
    picked = pick_tool([tool], named, [{"role": "user", "content": "call write"}], "call write")
    assert picked is not None
    assert_valid_and_harmless(tool, arguments(picked))


@pytest.mark.parametrize("stem", ["kilo_turn", "continue_turn"])
async def test_a_recorded_agent_turn_asking_for_a_file_gets_words_not_a_write(stem: str) -> None:
    body = json.loads((FIXTURES / f"{stem}.json").read_text())["body"]  # "write hello.py that prints hello"
    # (Kilo's max_tokens 32000 is more than the mock's context; Continue sends no tool_choice: vLLM makes it "auto")
    settings = MockSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        request = {**body, "model": settings.served_name, "max_tokens": 1000}
        response = await client.post("/v1/chat/completions", json=request)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    names = [
        c["function"]["name"]
        for e in events
        for ch in e["choices"]
        for c in ch["delta"].get("tool_calls") or []
        if c.get("function", {}).get("name")
    ]
    assert response.status_code == 200 and not set(names) & CHANGING, names


# ------------------------------------------------------------------------ names and schemas read by their parts


@pytest.mark.parametrize(
    ("name", "looks_only"),
    [
        ("task", False),  # Kilo's: launches a subagent (it merely ends in "ask")
        ("update_todo_list", False),  # "list" does not make a change harmless
        ("search_and_replace", False),
        ("todowrite", False),
        ("writeFile", False),
        ("Checklist", False),  # Continue's: replaces the checklist
        ("Exit", False),  # Continue's: ends the session
        ("background_process", False),
        ("skill", False),  # cannot tell (not "kill"): not called on its own either
        ("readFile", True),
        ("webfetch", True),
        ("CheckBackgroundJob", True),
        ("ask_followup_question", True),
        ("attempt_completion", True),
        ("get_weather", True),
    ],
)
def test_a_tool_is_called_on_its_own_only_when_every_part_of_its_name_only_looks(name: str, looks_only: bool) -> None:
    tools = [tool(name, {}), tool("list_files", {})]
    text = f"use {name.lower()} now"
    picked = pick_tool(tools, "auto", [{"role": "user", "content": text}], text)
    assert picked is not None and picked["function"]["name"] == (name if looks_only else "list_files")


def test_field_names_are_read_by_whole_parts() -> None:
    args = arguments(tool("lookup", {"description": {"type": "string"}, "file_pattern": {"type": "string"}}))
    assert args == {"description": "mock", "file_pattern": "TODO"}  # not a command ("script"), not a path
    args = arguments(tool("read_thing", {"filePath": {"type": "string"}, "workDir": {"type": "string"}}))
    assert args == {"filePath": "README.md", "workDir": "."}


NUMBERS = [
    {"type": "integer", "minimum": 1.5},
    {"type": "integer", "exclusiveMinimum": 1.5},
    {"type": "integer", "exclusiveMaximum": 1},
    {"type": "integer", "minimum": -3, "maximum": -1},
    {"type": "integer", "minimum": 7, "multipleOf": 5},
    {"type": "number", "minimum": 1.5},
    {"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1.5},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
    {"type": "number", "exclusiveMaximum": -2},
]


@pytest.mark.parametrize("schema", NUMBERS, ids=json.dumps)
def test_numbers_stay_within_their_bounds(schema: dict[str, Any]) -> None:
    candidate = tool("get_number", {"n": schema})
    args = arguments(candidate)
    assert jsonschema_rs.validator_for(candidate["function"]["parameters"]).is_valid(args), args


def test_all_of_merges_every_branch() -> None:
    candidate = tool(
        "get_merged",
        {
            "spec": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                    {"properties": {"b": {"type": "integer", "minimum": 3}}, "required": ["b"]},
                    {"properties": {"a": {"minLength": 6}}},
                ]
            }
        },
    )
    args = arguments(candidate)
    assert jsonschema_rs.validator_for(candidate["function"]["parameters"]).is_valid(args), args
    assert set(args["spec"]) == {"a", "b"}


@pytest.mark.parametrize(
    "items",
    [
        {"type": "string"},
        {"type": "string", "maxLength": 1},
        {"type": "string", "enum": ["x", "y", "z"]},
        {"type": "integer", "minimum": 0, "maximum": 5},
        {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    ],
    ids=json.dumps,
)
def test_arrays_of_unique_items_get_distinct_items(items: dict[str, Any]) -> None:
    candidate = tool("ask_user", {"options": {"type": "array", "items": items, "minItems": 3, "uniqueItems": True}})
    args = arguments(candidate)
    assert jsonschema_rs.validator_for(candidate["function"]["parameters"]).is_valid(args), args
    assert len(args["options"]) == 3
