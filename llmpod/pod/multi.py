"""``manage_pod.py`` with ``llmModels`` (issue 18): start the local models, hand them to the proxy, supervise them,
act on one (``--start``/``--stop``/``--restart ID``), report (``--status``) and stop everything (``--shutdown``).

A separate path from the single pod's (llmpod.pod.lifecycle): it needs no RunPod key, and ``pod_state.json`` holds a
``ModelsState`` (``"mode": "models"``) instead of a pod. The proxy and the watchdog are started and found exactly as
for one pod (llmpod.pod.sidecars: pid files with the owner mark); each model process carries its own mark
(llmpod.pod.supervisor.MODEL_OF), so ``--shutdown`` signals only what is ours.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llmpod.errors import ConfigError, LlmpodError, PodError
from llmpod.pod import processes
from llmpod.pod.config import PodConfig, check_port_free, load_pod_config
from llmpod.pod.models_config import RUNPOD_NOT_YET, ModelSpec, check_ports_free, load_models
from llmpod.pod.progress import Reporter
from llmpod.pod.sidecars import PROXY_MARKER, PROXY_OF, Sidecars, proxy_environment, stop_proxy
from llmpod.pod.state import RuntimePaths, clear_state, exclusive
from llmpod.pod.supervisor import (
    ModelRecord,
    ModelsState,
    ProcessOps,
    Supervisor,
    describe_exit,
    is_models_state,
    load_models_state,
    save_models_state,
    state_file,
    strays,
)
from llmpod.proxy_settings import ENV_NAMES

LOCK_WAIT = 120.0
BACKENDS_ENV = ENV_NAMES["backends"]  # PROXY_BACKENDS

SUPERVISE_EVERY = 1.0  # seconds between two supervisor rounds, at most


@dataclass
class Rig:
    config: PodConfig
    config_path: Path
    paths: RuntimePaths
    specs: tuple[ModelSpec, ...]
    ops: ProcessOps
    supervisor: Supervisor
    sidecars: Sidecars


def applies(args: argparse.Namespace, action: str) -> bool:
    """``llmModels`` in the config, or a record of them beside it (the config edited since): this path. A single
    pod's record beside a config that now has ``llmModels`` stays the single pod's to report and stop."""
    config_path = args.config.resolve()
    paths = RuntimePaths(config_path.parent)
    if is_models_state(paths):
        return True
    if not config_path.exists() or not load_pod_config(config_path).llmModels:
        return False
    if paths.state_file.exists():
        if action in ("status", "shutdown", "logs", "extend", "refresh_catalog"):
            return False
        raise ConfigError(
            f"{paths.state_file} records a pod started without llmModels: stop it first "
            "(`python3 manage_pod.py --shutdown`), then start the models"
        )
    return True


def rig(args: argparse.Namespace) -> Rig:
    config_path = args.config.resolve()
    config = load_pod_config(config_path)
    specs = load_models(config, config_path.parent, str(config_path))
    paths = RuntimePaths(config_path.parent)
    paths.ensure()
    (paths.run_dir / "models").mkdir(mode=0o700, exist_ok=True)
    ops = ProcessOps(paths, config_path.parent)
    sidecars = Sidecars(config=config, config_path=config_path, paths=paths, reporter=Reporter())
    return Rig(config, config_path, paths, specs, ops, Supervisor(specs, ops), sidecars)


def run(args: argparse.Namespace, action: str) -> int:
    r = rig(args)
    if action == "watchdog":
        return watch(r, args)
    if action == "up":
        return up(r)
    if action == "status":
        return status(r, args.json)
    if action == "shutdown":
        return shutdown(r)
    if action in ("start", "stop", "restart"):
        return one(r, action, getattr(args, action))
    raise ConfigError(f"--{action.replace('_', '-')} is not available with llmModels in {r.config_path}")


def _record(state: ModelsState, spec: ModelSpec) -> ModelRecord:
    if spec.id not in state.models:
        state.models[spec.id] = ModelRecord(id=spec.id, kind=spec.kind)
    return state.models[spec.id]


def up(r: Rig) -> int:
    if any(spec.kind == "runpod" for spec in r.specs):
        raise ConfigError(RUNPOD_NOT_YET)
    with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
        earlier = load_models_state(r.paths)
        state = earlier or ModelsState(proxy_port=r.config.proxy_port, created_at=time.time(), models={})
        for gone in [record for key, record in state.models.items() if key not in {s.id for s in r.specs}]:
            r.ops.stop(gone)  # taken out of the config since: not left running unrecorded
            del state.models[gone.id]
        fresh = [
            spec
            for spec in r.specs
            if spec.kind == "local" and not (spec.id in state.models and r.ops.alive(state.models[spec.id]))
        ]
        check_ports_free(tuple(fresh), str(r.config_path))  # before anything starts
        if r.sidecars.proxy_pid() is None:
            check_port_free(r.config.proxy_port)
        for spec in r.specs:
            record = _record(state, spec)
            if spec.kind == "external":
                record.state, record.since = "healthy", time.time()  # the proxy's own checks judge it
        for spec in fresh:
            record = _record(state, spec)
            record.restart_times, record.last_error = [], None
            r.supervisor.start(record)
        save_models_state(r.paths, state)
        try:
            for spec in fresh:
                wait_ready(r, spec, state.models[spec.id])
            save_models_state(r.paths, state)
            ensure_proxy(r)
            r.sidecars.ensure_watchdog()
        except (LlmpodError, KeyboardInterrupt):  # Ctrl-C or SIGTERM too: nothing half-started is left
            # what this run started goes (the one that failed stays down, with why); what ran before stays
            for spec in fresh:
                record = state.models[spec.id]
                if record.state == "down":
                    r.ops.stop(record)
                else:
                    r.supervisor.stop(record)
            if earlier is None:
                r.sidecars.stop()  # a proxy or watchdog this run started
                _stop_all(r, None)  # strays of a run killed before it saved its record
                clear_state(r.paths)
            else:
                save_models_state(r.paths, state)
            raise
    print(f"proxy: http://127.0.0.1:{r.config.proxy_port}/v1")
    for spec in r.specs:
        print(f"  {spec.id}: {state.models[spec.id].state} ({spec.kind}, {spec.base_url})")
    return 0


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
    """The proxy's environment: PROXY_BACKENDS with every model (llmpod/backends.py), the rest as for one pod."""
    backends = tuple(spec.backend(str(state_file(r.paths, spec.id))) for spec in r.specs if spec.base_url is not None)
    return proxy_environment(
        r.config,
        r.paths.root,
        {},
        upstream_url=backends[0].base_url,  # the proxy's single upstream for a body that names no model
        port=r.config.proxy_port,
        backends=backends,
    )


def ensure_proxy(r: Rig) -> None:
    """The proxy running with every model of the config: started, or restarted when its models are not these
    (the config was edited since; a restart lets its requests in flight finish first, as for --shutdown)."""
    env = proxy_env(r)
    pid = r.sidecars.proxy_pid()
    if pid is not None:
        if processes.environ_value(pid, BACKENDS_ENV) == env[BACKENDS_ENV]:
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


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2.0)  # any answer: a degraded proxy (a model down) is still up
        return True
    except httpx.HTTPError:
        return False


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} watchdog: {message}", flush=True)


def watch(r: Rig, args: argparse.Namespace) -> int:
    """The watchdog's loop with llmModels: a supervisor round, then the proxy, every interval. The config is
    read again each round (a model added by hand and started with --start is supervised too); while it does not
    load, the last good one is used."""
    # local checks only (pids, a state file, the config): a round every second at most, so that a dead model is
    # restarted within the supervisor's first backoff (1 s), not at the next 30 s watchdog interval
    interval = min(float(r.config.watchdog_interval_seconds), SUPERVISE_EVERY)
    pid_file = r.paths.watchdog_pid
    try:
        while True:
            try:
                r = rig(args)
            except ConfigError as exc:
                _log(f"{exc}; going on with the config as it was")
            r.supervisor.log = _log
            try:
                with exclusive(r.paths, LOCK_WAIT):
                    state = load_models_state(r.paths)
                    if state is None:
                        _log("no models recorded any more: exiting")
                        return 0
                    r.supervisor.round(state.models)
                    save_models_state(r.paths, state)
                    if r.sidecars.proxy_pid() is None:
                        _log("the proxy is not running: restarting it")
                        ensure_proxy(r)
            except LlmpodError as exc:  # a busy lock, a proxy that would not start: try again next round
                _log(f"round failed, will retry: {exc}")
            time.sleep(interval)
    finally:
        if processes.read_pid(pid_file) == os.getpid():
            pid_file.unlink(missing_ok=True)


def one(r: Rig, action: str, model_id: str) -> int:
    spec = next((s for s in r.specs if s.id == model_id), None)
    if spec is None:
        known = ", ".join(s.id for s in r.specs)
        raise ConfigError(f"{r.config_path}: llmModels has no model {model_id!r} (it has {known})")
    if spec.kind != "local":
        raise ConfigError(f"llmModels.{model_id} is not a local command: manage_pod.py does not start or stop it")
    with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
        state = load_models_state(r.paths)
        if state is None:
            raise LlmpodError("nothing is running from this directory: run `python3 manage_pod.py` first")
        record = _record(state, spec)
        if action in ("stop", "restart"):
            r.supervisor.stop(record)
            save_models_state(r.paths, state)
            if action == "stop":
                print(f"{model_id}: stopped (not restarted until --start {model_id})")
                return 0
        elif r.ops.alive(record):
            print(f"{model_id}: already running ({record.state})")
            return 0
        check_ports_free((spec,), str(r.config_path))
        record.restart_times, record.last_error = [], None
        r.supervisor.start(record)
        save_models_state(r.paths, state)
        try:
            wait_ready(r, spec, record)
        finally:
            save_models_state(r.paths, state)
        ensure_proxy(r)  # a model added to the config since the proxy started: it must know it
    print(f"{model_id}: {'restarted' if action == 'restart' else 'started'}, healthy")
    return 0


def _stop_all(r: Rig, state: ModelsState | None) -> list[str]:
    problems = []
    for record in state.models.values() if state else ():
        if record.kind == "local" and record.pid is not None:
            pid = record.pid
            gone = r.supervisor.stop(record) if record.id in r.supervisor.specs else r.ops.stop(record)
            if not gone:
                problems.append(f"model {record.id} (pid {pid}) did not exit")
    for pid in strays(r.paths):
        if not processes.stop(pid, grace=10.0):
            problems.append(f"process {pid} did not exit; kill it with `kill -9 {pid}`")
    return problems


def shutdown(r: Rig) -> int:
    with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
        state = load_models_state(r.paths)
        r.sidecars.stop()  # the watchdog first: it would restart what we stop
        problems = _stop_all(r, state)
        clear_state(r.paths)
    for problem in problems:
        print(f"warning: {problem}")
    count = len([m for m in state.models.values() if m.kind == "local"]) if state else 0
    print(f"stopped {count} model process{'es' if count != 1 else ''}, the proxy and the watchdog")
    return 0


def _shown_state(spec: ModelSpec, record: ModelRecord | None, live: bool, figures: dict[str, Any]) -> str:
    if record is None:
        return "not started"
    if spec.kind == "external" and isinstance(figures.get("state"), str):
        return str(figures["state"])  # an external server is the proxy's to judge: its view when it gives one
    return record.state if live else "down"


def status(r: Rig, as_json: bool) -> int:
    state = load_models_state(r.paths)
    metrics = r.sidecars.proxy_metrics() if state else None
    per_model = (metrics or {}).get("models") if isinstance((metrics or {}).get("models"), dict) else {}
    now = time.time()
    rows: list[dict[str, Any]] = []
    for spec in r.specs:
        record = state.models.get(spec.id) if state else None
        live = record is not None and (
            record.kind != "local" or record.stopped or record.state == "down" or r.ops.alive(record)
        )
        figures = per_model.get(spec.id) if isinstance(per_model, dict) else None
        figures = figures if isinstance(figures, dict) else {}
        shown = _shown_state(spec, record, live, figures)
        rows.append(
            {
                "id": spec.id,
                "kind": spec.kind,
                "base_url": spec.base_url,
                "state": shown,
                "uptime_seconds": round(now - record.since) if record and shown == "healthy" else None,
                "restarts": len(record.restart_times) if record else 0,
                "cost_per_hour": 0.0,
                "last_error": record.last_error if record else None,
                "requests": figures.get("requests"),
                "hit_rate": figures.get("cache_hit_rate", figures.get("hit_rate")),
            }
        )
    report = {"proxy": f"http://127.0.0.1:{r.config.proxy_port}/v1" if state else None, "models": rows}
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"proxy: {report['proxy'] or 'not running'}")
    for row in rows:
        extra = [f"up {row['uptime_seconds']}s" if row["uptime_seconds"] is not None else None]
        extra += [f"restarts {row['restarts']}", f"${row['cost_per_hour']:.2f}/h"]
        if row["requests"] is not None:
            extra.append(f"requests {row['requests']}")
        if isinstance(row["hit_rate"], int | float):
            extra.append(f"hit rate {row['hit_rate']:.0%}")
        if row["last_error"]:
            extra.append(f"last error: {row['last_error']}")
        print(f"  {row['id']}: {row['state']} ({', '.join(e for e in extra if e)})")
    return 0
