"""Tool calling: the ``vllm serve`` flags that let a model call tools, and the proxy's check for requests an
upstream without them refuses.

Facts from vLLM 0.33.0 (``vllm/renderers/online_renderer.py``, ``OnlineRenderer``'s chat preprocessing, and
``vllm/entrypoints/openai/chat_completion/protocol.py``, ``check_tool_usage``), confirmed on its own server:
a chat request with a non-empty ``tools`` list is a 400 unless the server runs with ``--enable-auto-tool-choice
--tool-call-parser P`` when ``tool_choice`` is absent (vLLM makes it ``"auto"``), ``"auto"``, ``"required"`` or a
named function. ``"none"`` and an explicit ``null`` pass, and so does a request without tools.

This module imports nothing of ours: the proxy uses it without loading the catalog.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

AUTO_TOOL_CHOICE = "--enable-auto-tool-choice"
TOOL_CALL_PARSER = "--tool-call-parser"
CHAT_TEMPLATE = "--chat-template"
TOOL_FLAGS = (AUTO_TOOL_CHOICE, TOOL_CALL_PARSER, CHAT_TEMPLATE)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value ``args`` give ``flag`` (``--flag value`` or ``--flag=value``; the last one, as argparse does)."""
    value = None
    for index, item in enumerate(args):
        if item == flag and index + 1 < len(args):
            value = args[index + 1]
        elif item.startswith(flag + "="):
            value = item[len(flag) + 1 :]
    return value


def tool_args(parser: str | None, chat_template: str | None, user_args: Sequence[str] = ()) -> list[str]:
    """The tool-calling flags to put before the user's ``vllm_args``: ``--enable-auto-tool-choice
    --tool-call-parser P`` (and ``--chat-template T``) for a model with a parser. A parser or template the user
    names in ``vllm_args`` replaces ours (so no flag is given twice); naming a parser for a model without one
    turns tool calling on for it."""
    user_parser = flag_value(user_args, TOOL_CALL_PARSER)
    if parser is None and user_parser is None:
        return []
    args = [] if AUTO_TOOL_CHOICE in user_args else [AUTO_TOOL_CHOICE]
    if user_parser is None and parser is not None:
        args += [TOOL_CALL_PARSER, parser]
    if chat_template is not None and flag_value(user_args, CHAT_TEMPLATE) is None:
        args += [CHAT_TEMPLATE, chat_template]
    return args


def serves_tools(parser: str | None, user_args: Sequence[str] = ()) -> bool:
    """Whether the pod started with ``tool_args(parser, ..., user_args)`` + ``user_args`` answers tool requests."""
    return parser is not None or flag_value(user_args, TOOL_CALL_PARSER) is not None


def needs_tool_parser(body: dict[str, Any]) -> bool:
    """True for a chat request vLLM 0.33 refuses when it runs without a tool-call parser (see the module doc)."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return False  # no tools, or vLLM's own 400 for a malformed or empty list
    choice = body.get("tool_choice", "auto")
    return choice is not None and choice != "none"


def refusal_message(model: str, capable: Iterable[str]) -> str:
    """One line for a tools request to an upstream that serves ``model`` without tool calling."""
    names = ", ".join(capable)
    instead = (
        f"to use an agent, serve one that can (set modelStoreId in pod_config.json): {names}"
        if names
        else "to use an agent, serve a model with tool calling"
    )
    return (
        f"model {model} is served without tool calling: use it for chat and autocomplete "
        f'(send no tools, or tool_choice "none"); {instead}'
    )
