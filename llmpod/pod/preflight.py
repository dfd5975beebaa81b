"""What a run checks and builds before it may create a pod: the model and its GPU candidates (offline, so a bad
config is exit 2 before any network call) and the provider (RunPod with the user's key, or a local process).
Shared by the single pod's run (llmpod.pod.cli) and the pods of llmModels (llmpod.pod.model_pods).
"""

from __future__ import annotations

import os
from pathlib import Path

from llmpod.errors import ConfigError
from llmpod.pod import fit
from llmpod.pod.catalog import Catalog, GpuEntry, ModelEntry, validate_config
from llmpod.pod.config import PodConfig
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import (
    DEFAULT_API_BASE,
    POD_URL_TEMPLATE,
    LocalProvider,
    Provider,
    RunPodClient,
    RunPodProvider,
)

__all__ = ["check_config", "make_provider"]


def check_config(
    config: PodConfig, catalog: Catalog, creating: bool, reporter: Reporter
) -> tuple[ModelEntry, list[GpuEntry]]:
    """The model and the GPU candidates it fits (llmpod.pod.fit), each skipped one said with its reason. Offline, so
    a bad modelStoreId is exit 2 at once even when RunPod cannot be reached. Only a run that may create a pod
    refuses: --status, --shutdown and the others act on the recorded pod (which may be billing) whatever the
    catalog thinks of the config now."""
    if not creating:
        try:
            return catalog.model(config.modelStoreId), []
        except ConfigError:
            return catalog.models[0], []  # never used to create; reports name the recorded pod's own model
    if config.provider == "local":
        return catalog.model(config.modelStoreId), []
    notes: list[str] = []
    model, gpus = validate_config(config, catalog, notes)
    fit.check_disk(model, config)  # no GPU can help with that: alone, before the candidates' notes
    for note in notes:
        reporter.say(note)
    return model, fit.usable_gpus(config, model, gpus, reporter.say)


def make_provider(config: PodConfig, pod_log: Path) -> Provider:
    if config.provider == "local":
        return LocalProvider(config, pod_log)
    key = os.environ.get("RUNPOD_API_KEY", "").strip()
    if not key:
        raise ConfigError(
            "RUNPOD_API_KEY is not set: create an API key at https://console.runpod.io/user/settings "
            "and `export RUNPOD_API_KEY=...` (or use --local to try without an account)"
        )
    client = RunPodClient(key, os.environ.get("RUNPOD_API_BASE") or DEFAULT_API_BASE)
    return RunPodProvider(client, config, os.environ.get("RUNPOD_POD_URL_TEMPLATE") or POD_URL_TEMPLATE)
