"""Cache-key normalisation: the request the key is computed on, with the volatile parts the rules name taken out.

The rules are data (``llmpod.key_rule_spec``: the built-in ones, the user's from ``CACHE_KEY_RULES`` or
``pod_config.json``, minus those switched off). ``KeyNormaliser.normalise`` returns a copy of the body in which
every match of a rule, in the messages and blocks it is scoped to, is replaced by a placeholder naming the rule,
and the names of the rules that took something out (also in the copy, so they are part of the key). The body
itself is never changed: it is what is forwarded. A body no rule touches is returned as is, with no names, so its
key is the one it always had. This is a step before ``keys.cache_key``, which hashes whatever it is given.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from llmpod.key_rule_spec import PATTERN_FLAGS, KeyRule, active_rules
from llmpod.proxy.settings import ProxySettings

RULES_FIELD = "\u0000key_rules"


def required_text(pattern: str) -> str:
    """Text that every match of ``pattern`` contains, or "" if none is known: a test with ``in`` (C speed) spares
    the regex most messages. Scanning a 13 kB system prompt for a line-anchored pattern takes Python's re ~70 us,
    so this is most of the cost of a Kilo request's key. The pattern is read with the re module's own parser, a
    private module: if it ever moves or changes, this returns "" and the rules only run slower."""
    try:
        if sys.version_info >= (3, 11):
            from re import _constants as constants
            from re import _parser as parser
        else:  # pragma: no cover - the 3.10 names
            import sre_constants as constants
            import sre_parse as parser
        parsed = parser.parse(pattern, PATTERN_FLAGS)
        if parsed.state.flags & constants.SRE_FLAG_IGNORECASE:
            return ""
        best, run = "", ""
        for op, value in parsed.data:  # the top level is a sequence: each of its literals is in every match
            if op is constants.LITERAL:
                run += chr(value)  # type: ignore[arg-type]  # a LITERAL's value is its code point
            else:
                best, run = max(best, run, key=len), ""
        return str(max(best, run, key=len))
    except Exception:  # any surprise from a private module means no shortcut, not an error
        return ""


class _Compiled:
    __slots__ = ("block", "marker", "name", "opening", "pattern", "required", "roles")

    def __init__(self, rule: KeyRule) -> None:
        self.name = rule.name
        self.pattern = re.compile(rule.pattern, PATTERN_FLAGS)
        self.required = required_text(rule.pattern)
        self.roles = frozenset(rule.roles)
        self.marker = f"\u27e6{rule.name}\u27e7"  # the key also names the rules applied: the marker need not be unique
        self.block: re.Pattern[str] | None = None
        self.opening = ""
        if rule.block is not None:
            tag = re.escape(rule.block)
            # the block's text between its opening tag (attributes allowed) and the nearest closing one
            self.block = re.compile(rf"(<{tag}(?:\s[^>]*)?>)(.*?)(</{tag}\s*>)", re.DOTALL)
            self.opening = f"<{rule.block}"  # a cheap test before the regex: most text holds no such block

    def apply(self, text: str) -> tuple[str, bool]:
        """``text`` with this rule's matches replaced, and whether there was any."""
        if self.required not in text:
            return text, False
        if self.block is None:
            replaced, count = self.pattern.subn(self.marker, text)
            return replaced, count > 0
        if self.opening not in text:
            return text, False
        found = False

        def inside(block: re.Match[str]) -> str:
            nonlocal found
            replaced, count = self.pattern.subn(self.marker, block.group(2))
            found = found or count > 0
            return block.group(1) + replaced + block.group(3)

        replaced = self.block.sub(inside, text)
        return (replaced, True) if found else (text, False)


class KeyNormaliser:
    """Applies the active rules to chat requests for their cache keys (completions' prompts are left as sent)."""

    def __init__(self, rules: tuple[KeyRule, ...]) -> None:
        self._rules = tuple(_Compiled(rule) for rule in rules)
        self.names = tuple(rule.name for rule in rules)

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> KeyNormaliser:
        return cls(active_rules(settings.key_rules, settings.key_rules_off))

    def normalise(self, endpoint: str, body: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
        """(the body to key on, the names of the rules that took something out, in rule order)."""
        messages = body.get("messages")
        if not self._rules or endpoint != "chat.completions" or not isinstance(messages, list):
            return body, ()
        applied: set[str] = set()
        changed: list[Any] | None = None  # copied on the first change: the client's body stays as it came
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            rules = [rule for rule in self._rules if not rule.roles or role in rule.roles]
            if not rules:
                continue
            content = self._content(message.get("content"), rules, applied)
            if content is not None:
                if changed is None:
                    changed = list(messages)
                changed[index] = {**message, "content": content}
        if changed is None:
            return body, ()
        names = tuple(name for name in self.names if name in applied)
        # the names are keyed too, under a field no client sends: a normalised request and one sent with the
        # placeholders in it never share a key
        return {**body, "messages": changed, RULES_FIELD: list(names)}, names

    def _content(self, content: Any, rules: list[_Compiled], applied: set[str]) -> Any:
        """The content with the rules applied, or None if none took anything out."""
        if isinstance(content, str):
            return self._text(content, rules, applied)
        if not isinstance(content, list):
            return None
        parts: list[Any] | None = None
        for index, part in enumerate(content):  # content parts: each text part on its own (Kilo sends two)
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                text = self._text(part["text"], rules, applied)
                if text is not None:
                    if parts is None:
                        parts = list(content)
                    parts[index] = {**part, "text": text}
        return parts

    @staticmethod
    def _text(text: str, rules: list[_Compiled], applied: set[str]) -> str | None:
        changed = False
        for rule in rules:
            text, found = rule.apply(text)
            if found:
                applied.add(rule.name)
                changed = True
        return text if changed else None
