"""``manage_pod.py`` with ``llmModels`` (issue 18): start the local models, hand them to the proxy, supervise them,
act on one (``--start``/``--stop``/``--restart ID``), report (``--status``) and stop everything (``--shutdown``).

A separate path from the single pod's (llmpod.pod.lifecycle): it needs no RunPod key, and ``pod_state.json`` holds a
``ModelsState`` (``"mode": "models"``) instead of a pod. The proxy and the watchdog are started and found exactly as
for one pod (llmpod.pod.sidecars: pid files with the owner mark); each model process carries its own mark
(llmpod.pod.supervisor.MODEL_OF), so ``--shutdown`` signals only what is ours.
"""

from __future__ import annotations

import argparse
import time

from llmpod.errors import CleanupFailedError, ConfigError, LlmpodError
from llmpod.pod import processes
from llmpod.pod.config import check_port_free, load_pod_config
from llmpod.pod.models_config import ModelSpec, check_ports_free
from llmpod.pod.models_rig import Rig, ensure_proxy, pod_ready, record_of, rig, wait_ready
from llmpod.pod.models_status import status
from llmpod.pod.models_watchdog import watch
from llmpod.pod.state import RuntimePaths, clear_state, exclusive
from llmpod.pod.supervisor import (
    ModelRecord,
    ModelsState,
    is_models_state,
    load_models_state,
    save_models_state,
    strays,
)

LOCK_WAIT = 120.0


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


def run(args: argparse.Namespace, action: str) -> int:
    r = rig(args, action)
    try:
        if action == "watchdog":
            return watch(r, args)
        if action in ("up", "start", "restart"):
            r.pods.check_access()  # a missing or refused RunPod key: exit 2 before anything starts
        if action == "up":
            return up(r)
        if action == "status":
            return status(r, args.json)
        if action == "shutdown":
            return shutdown(r, all_ours=bool(getattr(args, "all", False)))
        if action in ("start", "stop", "restart"):
            return one(r, action, getattr(args, action))
        raise ConfigError(f"--{action.replace('_', '-')} is not available with llmModels in {r.config_path}")
    finally:
        r.pods.close()


def up(r: Rig) -> int:
    runpod = [spec for spec in r.specs if spec.kind == "runpod"]
    with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
        earlier = load_models_state(r.paths)
        state = earlier or ModelsState(
            proxy_port=r.config.proxy_port, created_at=time.time(), models={}, local=r.pods.local
        )
        if runpod or earlier is not None:
            r.pods.report_leaks(state.models)
        for gone in [record for key, record in state.models.items() if key not in {s.id for s in r.specs}]:
            _stop_model(r, gone, "taken out of llmModels")  # not left running (or billing) unrecorded
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
            record = record_of(state, spec)
            if spec.kind == "external":
                record.state, record.since = "healthy", time.time()  # the proxy's own checks judge it
            elif spec.kind == "runpod" and (record.stopped or record.state != "healthy"):
                record.stopped, record.restart_times, record.last_error = False, [], None
                r.supervisor.set_state(record, "starting")
        for spec in fresh:
            record = record_of(state, spec)
            record.restart_times, record.last_error = [], None
            r.supervisor.start(record)
        save_models_state(r.paths, state)
    made: list[str] = []  # pods this run created (a reused one is not this run's to remove on failure)
    try:
        # outside the directory's lock: a pod loads for minutes, under its own lock, while the watchdog (when one
        # runs) keeps supervising the local models
        for spec in runpod:
            if r.pods.start(spec.id):
                made.append(spec.id)
        with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
            state = load_models_state(r.paths) or state
            try:
                for spec in runpod:
                    pod_ready(r, record_of(state, spec))
                for spec in fresh:
                    wait_ready(r, spec, record_of(state, spec))
            finally:
                save_models_state(r.paths, state)  # a model that failed is down, with why
            ensure_proxy(r)
            r.sidecars.ensure_watchdog()
    except (LlmpodError, KeyboardInterrupt) as exc:  # Ctrl-C or SIGTERM too: nothing half-started is left
        _undo_up(r, fresh, made, earlier is None, exc)
        raise
    print(f"proxy: http://127.0.0.1:{r.config.proxy_port}/v1")
    for spec in r.specs:
        record = state.models[spec.id]
        where = spec.base_url or record.base_url
        cost = f", ${record.cost_per_hour:.2f}/h" if spec.kind == "runpod" else ""
        print(f"  {spec.id}: {record.state} ({spec.kind}, {where}{cost})")
    return 0


def _undo_up(r: Rig, fresh: list[ModelSpec], made: list[str], first_run: bool, exc: BaseException) -> None:
    """What this run started goes (the one that failed stays down, with why); what ran before stays."""
    with exclusive(r.paths, LOCK_WAIT):
        state = load_models_state(r.paths)
        for model_id in made:
            r.pods.stop(model_id, "start-up of llmModels failed or was interrupted")
        for spec in fresh:
            record = state.models.get(spec.id) if state else None
            if record is not None:
                r.ops.stop(record) if record.state == "down" else r.supervisor.stop(record)
        for record in state.models.values() if state else ():
            if record.kind == "runpod" and record.state == "starting":
                r.supervisor.set_state(record, "down", str(exc) or "interrupted")
        if first_run:
            r.sidecars.stop()  # a proxy or watchdog this run started
            _stop_all(r, None)  # strays of a run killed before it saved its record
            clear_state(r.paths)
        elif state is not None:
            save_models_state(r.paths, state)


def _stop_model(r: Rig, record: ModelRecord, reason: str) -> bool:
    """Stop one model whatever its kind: its process, or its pod (terminated, verified). True when gone."""
    if record.kind == "runpod":
        r.pods.stop(record.id, reason)
        return True
    if record.kind == "local":
        return r.supervisor.stop(record) if record.id in r.supervisor.specs else r.ops.stop(record)
    return True


def one(r: Rig, action: str, model_id: str) -> int:
    spec = next((s for s in r.specs if s.id == model_id), None)
    if spec is None:
        known = ", ".join(s.id for s in r.specs)
        raise ConfigError(f"{r.config_path}: llmModels has no model {model_id!r} (it has {known})")
    if spec.kind == "external":
        raise ConfigError(f"llmModels.{model_id} is a server someone else runs: manage_pod.py cannot start or stop it")
    if spec.kind == "runpod":
        return one_pod(r, action, spec)
    with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
        state = _running(r)
        record = record_of(state, spec)
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


def _running(r: Rig) -> ModelsState:
    state = load_models_state(r.paths)
    if state is None:
        raise LlmpodError("nothing is running from this directory: run `python3 manage_pod.py` first")
    return state


def one_pod(r: Rig, action: str, spec: ModelSpec) -> int:
    """--start/--stop/--restart of a RunPod model: its pod is made or terminated under its own lock, so the
    other models keep being supervised while it loads."""
    with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
        record = record_of(_running(r), spec)
        if action == "start" and record.state == "healthy" and not record.stopped:
            print(f"{spec.id}: already running (pod {record.pod_id})")
            return 0
    if action in ("stop", "restart"):
        result = r.pods.stop(spec.id, f"--{action} {spec.id}")
        spend = f", spend ${result.spend_usd:.2f}" if result.spend_usd is not None else ""
        with exclusive(r.paths, LOCK_WAIT):
            state = _running(r)
            record = record_of(state, spec)
            r.supervisor.stop(record)  # stopped: never replaced until --start
            record.pod_id = None
            save_models_state(r.paths, state)
        if action == "stop":
            print(f"{spec.id}: pod terminated ({', '.join(result.terminated) or 'none was running'}{spend})")
            return 0
    with exclusive(r.paths, LOCK_WAIT):
        state = _running(r)
        record = record_of(state, spec)
        record.stopped, record.restart_times, record.last_error = False, [], None
        r.supervisor.set_state(record, "starting")
        save_models_state(r.paths, state)
    try:
        made = r.pods.start(spec.id)
        with exclusive(r.paths, LOCK_WAIT):
            state = _running(r)
            pod_ready(r, record_of(state, spec))
            save_models_state(r.paths, state)
            ensure_proxy(r)  # the new pod's URL and key
    except (LlmpodError, KeyboardInterrupt) as exc:
        with exclusive(r.paths, LOCK_WAIT):
            state = _running(r)
            r.supervisor.set_state(record_of(state, spec), "down", str(exc) or "interrupted")
            save_models_state(r.paths, state)
        raise
    record = state.models[spec.id]
    verb = "restarted" if action == "restart" else "started" if made else "reusing"
    print(f"{spec.id}: {verb} pod {record.pod_id} (${record.cost_per_hour:.2f}/h), healthy")
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


def shutdown(r: Rig, all_ours: bool = False) -> int:
    terminated: list[str] = []
    billing: list[CleanupFailedError] = []  # pods that may still bill: exit 4 once everything else is stopped
    spend = 0.0
    with exclusive(r.paths, LOCK_WAIT, "waiting for another manage_pod.py to finish..."):
        state = load_models_state(r.paths)
        if not all_ours and (state is not None or r.pods.sessions):
            r.pods.report_leaks(state.models if state else {})
        r.sidecars.stop()  # the watchdog first: it would restart (or replace) what we stop
        problems = _stop_all(r, state)
        recorded = [m.id for m in state.models.values() if m.kind == "runpod"] if state else []
        for model_id in dict.fromkeys([*recorded, *r.pods.sessions]):
            try:
                result = r.pods.stop(model_id, "requested (--shutdown)")
            except CleanupFailedError as exc:  # the others are still stopped; this one is said, with how to end it
                billing.append(exc)
                continue
            except LlmpodError as exc:
                problems.append(f"model {model_id}: {exc}")
                continue
            terminated += result.terminated
            spend += result.spend_usd or 0.0
        if all_ours:
            terminated += [pod for pod in r.pods.terminate_all_ours() if pod not in terminated]
        clear_state(r.paths)
    for problem in problems:
        print(f"warning: {problem}")
    count = len([m for m in state.models.values() if m.kind == "local"]) if state else 0
    pods = f", terminated pod{'s' if len(terminated) != 1 else ''} {', '.join(terminated)} (spend ${spend:.2f})"
    print(
        f"stopped {count} model process{'es' if count != 1 else ''}{pods if terminated else ''}, "
        "the proxy and the watchdog"
    )
    if billing:
        raise CleanupFailedError("; ".join(str(exc) for exc in billing))
    return 0
