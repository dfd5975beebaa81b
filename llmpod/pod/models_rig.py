"""What every command with ``llmModels`` works on (``Rig``: the config, its models, the supervisor, the pods of the
RunPod entries, the proxy and watchdog) and the steps they share: a record per model, waiting for a local model,
handing a ready pod over, and the proxy with every model (``PROXY_BACKENDS``)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmpod.backends import Backend, backends_from_env
from llmpod.errors import ConfigError, PodError
from llmpod.pod import processes
from llmpod.pod.config import PodConfig, load_pod_config
from llmpod.pod.model_pods import ModelPods
from llmpod.pod.models_config import ModelSpec, load_models
from llmpod.pod.progress import Reporter
from llmpod.pod.sidecars import PROXY_MARKER, PROXY_OF, Sidecars, proxy_environment, stop_proxy
from llmpod.pod.state import RuntimePaths
from llmpod.pod.supervisor import (
    ModelRecord,
    ModelsState,
    ProcessOps,
    Supervisor,
    describe_exit,
    is_models_state,
    load_models_state,
    state_file,
)
from llmpod.proxy_settings import ENV_NAMES

__all__ = ["Rig", "ensure_proxy", "pod_ready", "proxy_env", "record_of", "rig", "wait_ready"]

BACKENDS_ENV = ENV_NAMES["backends"]  # PROXY_BACKENDS


@dataclass
class Rig:
    config: PodConfig
    config_path: Path
    paths: RuntimePaths
    specs: tuple[ModelSpec, ...]
    ops: ProcessOps
    supervisor: Supervisor
    sidecars: Sidecars
    pods: ModelPods  # the RunPod entries: a pod each (llmpod.pod.model_pods)


def rig(args: argparse.Namespace, action: str = "status") -> Rig:
    config_path = args.config.resolve()
    config = load_pod_config(config_path)
    specs = load_models(config, config_path.parent, str(config_path))
    paths = RuntimePaths(config_path.parent)
    paths.ensure()
    (paths.run_dir / "models").mkdir(mode=0o700, exist_ok=True)
    ops = ProcessOps(paths, config_path.parent)
    sidecars = Sidecars(config=config, config_path=config_path, paths=paths, reporter=Reporter())
    recorded = load_models_state(paths) if is_models_state(paths) else None
    local = bool(getattr(args, "local", False)) or (recorded is not None and recorded.local)
    creating = action in ("up", "start", "restart", "watchdog")  # the watchdog replaces pods: GPU candidates
    pods = ModelPods(config, config_path, paths, specs, local=local, creating=creating)
    return Rig(config, config_path, paths, specs, ops, Supervisor(specs, ops), sidecars, pods)


def record_of(state: ModelsState, spec: ModelSpec) -> ModelRecord:
    if spec.id not in state.models:
        state.models[spec.id] = ModelRecord(id=spec.id, kind=spec.kind)
    return state.models[spec.id]


def pod_ready(r: Rig, record: ModelRecord) -> None:
    pod = r.pods.pod_state(record.id)
    if pod is None or pod.phase != "ready":
        raise PodError(f"llmModels.{record.id}: its pod was removed while starting; run manage_pod.py again")
    r.pods.adopt(record, pod)
    r.supervisor.set_state(record, "healthy")


def wait_ready(r: Rig, spec: ModelSpec, record: ModelRecord) -> None:
    """Until the model answers, bounded by its start_timeout_seconds; a crash at start is one line."""
    deadline = time.monotonic() + spec.start_timeout_seconds
    while True:
        if not r.ops.alive(record):
            assert record.pid is not None
            why = describe_exit(r.ops.exit_status(record.pid), r.ops.last_line(spec))
            r.supervisor.set_state(record, "down", why)
            raise PodError(f"llmModels.{spec.id} did not start: {why}")
        if r.ops.ready(spec):
            r.supervisor.set_state(record, "healthy")
            return
        if time.monotonic() > deadline:
            r.ops.stop(record)
            last = r.ops.last_line(spec)
            why = f"not ready within {spec.start_timeout_seconds:g}s" + (f": {last}" if last else "")
            r.supervisor.set_state(record, "down", why)
            raise PodError(f"llmModels.{spec.id} did not start: {why}")
        time.sleep(0.1)


def proxy_env(r: Rig) -> dict[str, str]:
    """The proxy's environment: PROXY_BACKENDS with every model (llmpod/backends.py), the rest as for one pod. A
    RunPod model is handed over with its pod's URL and vLLM key; its state file tells the proxy when it has none."""
    state = load_models_state(r.paths)
    backends = []
    for spec in r.specs:
        file = str(state_file(r.paths, spec.id))
        if spec.kind == "runpod":
            backends.append(r.pods.backend(spec, state.models.get(spec.id) if state else None, file))
        elif spec.base_url is not None:
            backends.append(spec.backend(file))
    return proxy_environment(
        r.config,
        r.paths.root,
        {},
        upstream_url=backends[0].base_url,  # the proxy's single upstream for a body that names no model
        port=r.config.proxy_port,
        backends=tuple(backends),
    )


def ensure_proxy(r: Rig) -> None:
    """The proxy running with every model of the config: started, or restarted when its models are not these
    (the config was edited since; a restart lets its requests in flight finish first, as for --shutdown)."""
    env = proxy_env(r)
    pid = r.sidecars.proxy_pid()
    if pid is not None:
        if _same_models(r, processes.environ_value(pid, BACKENDS_ENV) or "", env[BACKENDS_ENV]):
            return
        stop_proxy(r.paths.proxy_pid, r.sidecars.owner(PROXY_OF))
    processes.spawn_detached(
        processes.python_module(PROXY_MARKER), env=env, log_path=r.paths.proxy_log, pid_path=r.paths.proxy_pid
    )
    deadline = time.monotonic() + 20
    while not _answers(f"http://127.0.0.1:{r.config.proxy_port}/health"):
        if time.monotonic() > deadline or r.sidecars.proxy_pid() is None:
            raise PodError(f"the proxy did not start on port {r.config.proxy_port}; see {r.paths.proxy_log}")
        time.sleep(0.1)


def _same_models(r: Rig, running: str, wanted: str) -> bool:
    """The proxy already has these models. A RunPod model's URL and key are left out: a replaced pod reaches the
    proxy through the model's state file (``BackendState.base_url``), so the other models are never interrupted
    by a proxy restart for it."""
    pods = {spec.id for spec in r.specs if spec.kind == "runpod"}

    def models(value: str) -> list[Backend]:
        try:
            listed = backends_from_env(value)
        except ConfigError:
            return []
        return [b.model_copy(update={"base_url": "-", "api_key": None}) if b.id in pods else b for b in listed]

    return running == wanted or (bool(running) and models(running) == models(wanted))


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2.0)  # any answer: a degraded proxy (a model down) is still up
        return True
    except httpx.HTTPError:
        return False
