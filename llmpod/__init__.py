"""llmpod: a RunPod pod manager with a bundled OpenAI-compatible caching proxy."""

from __future__ import annotations

__version__ = "0.1.0"
