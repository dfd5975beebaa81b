"""Cache-key rules as data: the volatile parts of a chat request that the proxy's cache key leaves out.

Coding agents put the time into every request (Kilo a ``Message time:`` line in each user turn, Kilo and Continue
the day in their system prompt), so a task run again a minute later never hit the cache, though its answer does not
depend on the second it was asked. A rule names such a part: a regular expression, scoped to where it may apply (the
messages of some roles, and/or the text inside a tag block such as ``<environment_details>…</environment_details>``).
The proxy (``llmpod/proxy/key_rules.py``) computes the key on a copy of the request in which each match is replaced
by a placeholder naming the rule; the request it forwards is the client's, untouched.

A shared module: the pod manager checks the rules of ``pod_config.json`` with it before the proxy starts, and the
settings contract (``llmpod/proxy_settings.py``) carries them to the proxy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

# the chat roles a rule may be scoped to: a misspelt role would silently never apply
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
ALL_RULES = "all"  # in the switched-off list: no rule applies, every key is the request's own
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_TAG = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}\Z")
PATTERN_FLAGS = re.MULTILINE  # ``^`` and ``$`` are a line's ends: the volatile parts real clients send are lines


class KeyRule(BaseModel):
    """One volatile part of a request, left out of its cache key (never out of what is forwarded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Shown in X-Cache-Rules and /debug/cache; switches the rule off by name.")
    pattern: str = Field(description="A Python regular expression (multi-line: ^ and $ match at each line).")
    roles: list[str] = Field([], description="Only in messages of these roles; empty = any role.")
    block: str | None = Field(None, description="Only inside <block ...>…</block> of the message text.")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("a rule name is 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")
        return value

    @field_validator("pattern")
    @classmethod
    def _a_pattern_that_takes_something(cls, value: str) -> str:
        try:
            compiled = re.compile(value, PATTERN_FLAGS)
        except re.error as exc:
            raise ValueError(f"is not a regular expression: {exc}") from None
        # one that matches nothing at all would "apply" to every request and tell two of them apart by nothing
        if compiled.search("") is not None:
            raise ValueError("matches the empty string: it must take out something")
        return value

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = [role for role in value if role not in ROLES]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r} (roles are {', '.join(ROLES)})")
        return value

    @field_validator("block")
    @classmethod
    def _tag_name(cls, value: str | None) -> str | None:
        if value is not None and not _TAG.match(value):
            raise ValueError("block is a tag name such as environment_details (no < >)")
        return value


_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_ISO_TIME = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?"

# What real clients send, as recorded (tests/fixtures/clients/, bench/sessions/). Each is a whole line, inside the
# block the client writes it in, in the role it writes it in: the same words typed by the user in a question stay.
BUILTIN_RULES: tuple[KeyRule, ...] = (
    KeyRule(
        name="kilo-message-time",
        pattern=rf"^Message time: {_ISO_TIME}[ \t]*$",
        roles=["user"],
        block="environment_details",
        description="Kilo Code CLI 7.x: the time of each user turn (to the second), in its <environment_details>",
    ),
    KeyRule(
        name="kilo-today",
        pattern=rf"^[ \t]*Today's date: {_DAY} {_MONTH} \d{{2}} \d{{4}}[ \t]*$",
        roles=["system"],
        block="env",
        description="Kilo Code CLI 7.x: the day (JavaScript's toDateString) in the <env> block of its system prompt",
    ),
    KeyRule(
        name="continue-today",
        pattern=r"^[ \t]*Today's date: \d{4}-\d{2}-\d{2}[ \t]*$",
        roles=["system"],
        block="env",
        description="Continue CLI 1.x: the day (YYYY-MM-DD) in the <env> block of its system prompt",
    ),
    KeyRule(
        name="aider-current-date",
        pattern=r"^- Current date: \d{4}-\d{2}-\d{2}[ \t]*$",
        roles=["system"],
        description="aider 0.86: the day in the system info of its system prompt (a line only aider writes there)",
    ),
    KeyRule(
        name="kilo-legacy-current-time",
        pattern=rf"^Current time in ISO 8601 UTC format: {_ISO_TIME}[ \t]*$",
        roles=["user"],
        block="environment_details",
        description="Kilo Code extension up to 5.x (and Roo Code, Cline's heirs): the time under '# Current Time'",
    ),
)
BUILTIN_NAMES = frozenset(rule.name for rule in BUILTIN_RULES)


def check_rule_set(user_rules: Iterable[KeyRule], switched_off: Iterable[str]) -> None:
    """Raise ``ValueError`` for a user rule named like another, or an unknown name in the switched-off list."""
    seen = set(BUILTIN_NAMES)
    for rule in user_rules:
        if rule.name in seen:
            hint = " (switch the built-in one off and name yours otherwise)" if rule.name in BUILTIN_NAMES else ""
            raise ValueError(f"rule name {rule.name!r} is used twice{hint}")
        seen.add(rule.name)
    for name in switched_off:
        if name != ALL_RULES and name not in seen:
            raise ValueError(
                f"{name!r} is switched off but is no rule (there are {ALL_RULES}, {', '.join(sorted(seen))})"
            )


def active_rules(user_rules: Iterable[KeyRule], switched_off: Iterable[str]) -> tuple[KeyRule, ...]:
    """The rules that apply, in order (built-in first): none when ``all`` is switched off."""
    off = set(switched_off)
    if ALL_RULES in off:
        return ()
    return tuple(rule for rule in (*BUILTIN_RULES, *user_rules) if rule.name not in off)
