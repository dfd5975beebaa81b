"""The caching proxy: an OpenAI-compatible endpoint in front of a vLLM server (``python -m llmpod.proxy``).

Public names: ``create_app(settings)`` builds the app, ``ProxySettings`` holds its settings. ``create_app`` is
imported on first use: the server stack takes ~0.5 s to import, and a bad setting is reported before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmpod.proxy_settings import ProxySettings

if TYPE_CHECKING:
    from llmpod.proxy.app import create_app

__all__ = ["ProxySettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from llmpod.proxy.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
