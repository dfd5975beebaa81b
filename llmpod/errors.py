"""The project's own exceptions.

    LlmpodError                 anything we expect and can explain in one line
    ├── ConfigError             a bad setting, env var or config file (exit code 2)
    └── UpstreamError           the model server failed; carries an HTTP status and an OpenAI error body

The CLIs catch ``LlmpodError`` in exactly one place each and turn it into a one-line message and an
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class LlmpodError(Exception):
    """An expected failure with a message fit to show the user as it is."""

    exit_code = 1


class ConfigError(LlmpodError):
    """A setting is missing or invalid; nothing was started."""

    exit_code = 2


class UpstreamError(LlmpodError):
    """The upstream model server answered with an error, or could not be reached.

    ``status`` is what the proxy answers its client with; ``body`` is already in the OpenAI error shape.
    """

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(str(body.get("error", {}).get("message", "upstream error")))
        self.status = status
        self.body = body
        self.headers = headers or {}
