"""The mock vLLM server, for tests, benchmarks and ``manage_pod.py --local`` (``python -m llmpod.mock``).

Public names: ``create_app(settings)`` builds the app, ``MockSettings`` holds its settings. Both are imported on
first use, so importing one of the package's modules does not load the server stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmpod.mock.server import create_app
    from llmpod.mock.state import MockSettings

__all__ = ["MockSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from llmpod.mock.server import create_app

        return create_app
    if name == "MockSettings":
        from llmpod.mock.state import MockSettings

        return MockSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
