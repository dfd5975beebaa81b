"""The pod manager behind ``manage_pod.py`` (``python -m llmpod.pod``): config, catalog, the pod's lifecycle on a
provider (RunPod or a local process), the proxy and watchdog beside it, and what the user sees.

Public names: ``main`` (the command line), ``Session`` (one run's lifecycle), ``PodConfig`` and
``load_pod_config`` (``pod_config.json``).
"""

from __future__ import annotations

from llmpod.pod.cli import main
from llmpod.pod.config import PodConfig, load_pod_config
from llmpod.pod.lifecycle import Session

__all__ = ["PodConfig", "Session", "load_pod_config", "main"]
