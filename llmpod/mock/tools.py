"""Tool calling in the mock vLLM server: which tool the mock model calls, and with which arguments.

vLLM 0.33 only parses tool calls when started with ``--enable-auto-tool-choice --tool-call-parser NAME``; the
refusals without them live in ``llmpod.mock.requests``. With them, the mock calls at most one tool per answer:

- ``tool_choice`` naming a function: that one. ``"required"``: a read-only tool (one the user's last message names
  first), else a tool it names, else the first. ``"auto"`` (or absent): only a READ-ONLY tool, and only when the
  conversation ends with a user message that names one or says "call" or "use" (then the safest read-only tool);
  otherwise (a message asking for a change, such as Kilo's "write hello.py", included), and after a tool result,
  the model answers in words.

The arguments (made in ``tool_arguments``) are VALID against the tool's JSON schema (types, ``enum``/``const``,
``required``, ``default``, nested objects and arrays, string and number bounds) and HARMLESS, because an agent in
``manage_pod.py --local`` mode executes them in the user's repository: paths are ``.``, or ``README.md`` for a
read-only tool (never a new file with a made-up name), commands are ``echo``, booleans are false (no ``recursive``,
``force``), and optional fields are left out unless they have a default. A tool that changes things, called only
when forced, gets arguments that fail or do nothing: path ``.`` (a directory, which no write or edit tool can
overwrite as a file), empty text, as few array items as the schema allows.
"""

from __future__ import annotations

import re
import secrets
import string
from typing import Any

# `ToolParserManager.list_registered()` of vLLM 0.33.0: what --tool-call-parser accepts
VLLM_TOOL_PARSERS = (
    "apertus",
    "beam",
    "cohere_command3",
    "cohere_command4",
    "deepseek_v3",
    "deepseek_v31",
    "deepseek_v32",
    "deepseek_v4",
    "deepseek_v41",
    "dots",
    "ernie45",
    "functiongemma",
    "gemma4",
    "gigachat3",
    "glm45",
    "glm47",
    "granite",
    "granite-20b-fc",
    "granite4",
    "hermes",
    "hf",
    "hunyuan_a13b",
    "hy_v3",
    "hy_v4",
    "inkling",
    "internlm",
    "jamba",
    "k2_horizon",
    "kimi_k2",
    "kimi_k3",
    "lfm2",
    "ling3",
    "llama3_json",
    "llama4_json",
    "llama4_pythonic",
    "longcat",
    "mimo",
    "minicpm5",
    "minimax_m2",
    "minimax_m3",
    "mistral",
    "muse",
    "muse_glimmer",
    "musespark1x",
    "olmo3",
    "openai",
    "phi4_mini_json",
    "plamo3",
    "poolside_v1",
    "pythonic",
    "qwen3_coder",
    "qwen3_json",
    "qwen3_xml",
    "seed_oss",
    "step3",
    "step3p5",
    "step5",
    "xlam",
)


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Tool names are read by their parts ("search_and_replace", "readFile", "CheckBackgroundJob"), never by substrings
# ("task" is not "ask", "skill" is not "kill"). A part that changes things wins over any part that only looks.
_LOOKING = words(
    "read list ls search find grep glob get view show fetch query lookup look ask question attempt completion "
    "complete status describe inspect check recall info stat cat explore"
)
_CHANGING = words(
    "write edit create delete remove rm apply replace insert execute exec run command move mv rename patch update "
    "save commit push install terminal shell bash switch browser kill new task tasks agent subagent spawn launch "
    "start stop restart exit quit process schedule cancel post send set put add append upload deploy todo todos "
    "checklist mark"
)
# changing stems that also count inside a compound part ("todowrite", "multiedit"); looking words of 4+ letters
# count at either end of one ("webfetch", "readfile")
_CHANGING_STEMS = (
    "write",
    "edit",
    "delete",
    "remove",
    "replace",
    "insert",
    "execute",
    "command",
    "rename",
    "patch",
    "update",
    "commit",
    "install",
    "terminal",
    "shell",
    "bash",
    "browser",
    "todo",
    "spawn",
    "launch",
    "schedule",
    "cancel",
    "upload",
    "append",
    "create",
    "apply",
)
_ASK_TO_CALL = re.compile(r"\b(call|use)\b")


def name_parts(name: str) -> list[str]:
    """The lower-case parts of a tool or field name, split at ``_``, ``-``, ``.`` and camelCase."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return [part for part in re.split(r"[\s_\-.:/]+", spaced.lower()) if part]


def safety(tool: dict[str, Any]) -> int:
    """0 for a read-only tool, 1 for one we cannot tell, 2 for one that changes things."""
    parts = name_parts(str(tool["function"]["name"]))
    if any(part in _CHANGING or any(stem in part for stem in _CHANGING_STEMS) for part in parts):
        return 2
    looking = any(
        part in _LOOKING or any(len(w) >= 4 and (part.startswith(w) or part.endswith(w)) for w in _LOOKING)
        for part in parts
    )
    return 0 if looking else 1


def _named_in(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in tools if re.search(rf"(?<!\w){re.escape(str(t['function']['name']).lower())}(?!\w)", text)]


def pick_tool(
    tools: list[dict[str, Any]],
    choice: Any,
    messages: list[dict[str, Any]],
    user_text: str,
) -> dict[str, Any] | None:
    """The tool the mock model calls (``tools`` and ``choice`` already validated), or None to answer in words.

    On its own (``"auto"``) the mock calls only read-only tools: an agent in ``manage_pod.py --local`` runs the
    call in the user's repository, so "write hello.py" must not get back a write (or edit, or bash)."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return next(dict(t) for t in tools if t["function"]["name"] == name)
    text = user_text.lower()
    named = sorted(_named_in(text, tools), key=safety)
    safest = sorted(tools, key=safety)
    looking = [t for t in named + safest if safety(t) == 0]
    if choice == "required":  # a read-only tool if there is one, named ones first; else what the user named
        return dict((looking or named or safest)[0])
    if choice != "auto" or not messages or messages[-1].get("role") != "user":
        return None  # "none", or after a tool result: the model answers in words
    if named and safety(named[0]) == 0:
        return dict(named[0])
    if _ASK_TO_CALL.search(text) and looking:
        return dict(looking[0])
    return None  # asked for a change ("write hello.py"): words, never a tool that changes things


def call_id(parser: str | None, name: str, index: int = 0) -> str:
    """A tool call id as vLLM 0.33's parser makes it (vllm/renderers/chat_utils/tool_call.py:make_tool_call_id,
    vllm/tool_parsers/*): kimi_k2 numbers calls per function, mistral uses 9 letters and digits, most parsers
    ``chatcmpl-tool-`` and 16 hex digits."""
    if parser in ("kimi_k2", "kimi_k3"):
        return f"functions.{name}:{index}"
    if parser == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    if parser in ("hunyuan_a13b", "minicpm5"):
        return f"call_{secrets.token_hex(8)}"
    if parser == "xlam":
        return f"call_{index}_{secrets.token_hex(8)}"
    return f"chatcmpl-tool-{secrets.token_hex(8)}"
