"""The supervisor of several models (issue 18): each local model's process, its record in ``pod_state.json`` and
the ``BackendState`` file the proxy reads (llmpod/backends.py).

A round (``Supervisor.round``, called by the watchdog on its interval and testable in-process with a fake ``Ops``
and clock) looks at every local model the user has not stopped:

- ``starting``/``restarting`` with its process answering ``/health`` and ``/v1/models``: ``healthy``;
- a process that died (or never got ready within its ``start_timeout_seconds``): restarted under its policy with
  exponential backoff (state ``restarting``, ``restarts`` counted in ``restart_window_seconds``), or ``down`` with
  the reason (its exit status when known, and its last output line) once the policy says no more;
- ``restarting`` whose backoff has passed: a new process.

Every change is written to the model's state file at once, so the proxy and ``--status`` see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmpod._files import atomic_write
from llmpod.backends import BackendState, Lifecycle, write_state
from llmpod.errors import ConfigError
from llmpod.pod import processes
from llmpod.pod.models_config import ModelSpec
from llmpod.pod.sidecars import PROXY_OF, WATCHDOG_OF
from llmpod.pod.state import RuntimePaths, load_state

MODEL_OF = "LLMPOD_MODEL_OF"  # in each model process's environment: this directory (ownership, strays)
MODEL_NAME_OF = "LLMPOD_MODEL_ID"  # and which model it is
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0


class ModelRecord(BaseModel):
    """One model as the pod manager last left it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str
    kind: Literal["local", "external", "runpod"]
    state: Lifecycle = "starting"
    since: float = Field(default_factory=time.time)
    pid: int | None = None
    started_at: float | None = None  # when its current process was started (ownership: an older pid is not ours)
    restart_times: list[float] = []  # restarts in the policy's window
    next_restart_at: float | None = None
    last_error: str | None = None
    stopped: bool = False  # by --stop: never restarted until --start or --restart
    # a RunPod model (llmpod.pod.model_pods): its pod as last made, and the expiry a replacement keeps
    pod_id: str | None = None
    base_url: str | None = None
    cost_per_hour: float = 0.0
    expires_at: float | None = None


class ModelsState(BaseModel):
    """``pod_state.json`` when ``llmModels`` is in use."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    mode: Literal["models"] = "models"
    proxy_port: int
    created_at: float
    models: dict[str, ModelRecord]
    local: bool = False  # started with --local: RunPod entries run as local mock processes


def is_models_state(paths: RuntimePaths) -> bool:
    try:
        return bool(json.loads(paths.state_file.read_bytes()).get("mode") == "models")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def load_models_state(paths: RuntimePaths) -> ModelsState | None:
    try:
        raw = paths.state_file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return ModelsState.model_validate_json(raw)
    except ValidationError:
        raise ConfigError(
            f"{paths.state_file} is damaged; stop what it named by hand, remove it, and start again"
        ) from None


def save_models_state(paths: RuntimePaths, state: ModelsState) -> None:
    atomic_write(paths.state_file, state.model_dump_json(indent=2).encode() + b"\n", mode=0o600, exact_mode=True)


def safe_name(model_id: str) -> str:
    # ids may hold / and : ; the hash keeps two ids that clean up alike apart
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_id)[:60] + "-" + hashlib.sha256(model_id.encode()).hexdigest()[:8]


def state_file(paths: RuntimePaths, model_id: str) -> Path:
    return paths.run_dir / "models" / f"{safe_name(model_id)}.state.json"


def pod_paths(paths: RuntimePaths, model_id: str) -> RuntimePaths:
    """Where one RunPod model's record, lock and logs live: ``.llmpod/pods/ID/`` (llmpod.pod.model_pods)."""
    return RuntimePaths(paths.root, run_dir=paths.run_dir / "pods" / safe_name(model_id))


def log_file(paths: RuntimePaths, model_id: str) -> Path:
    return paths.run_dir / "models" / f"{safe_name(model_id)}.log"


def backoff(restarts: int) -> float:
    """Seconds before the ``restarts``-th restart in the window: 1, 2, 4, … up to a minute."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, restarts - 1))


def describe_exit(status: int | None, last_line: str) -> str:
    if status is None:
        why = "exited"
    elif status < 0:
        try:
            why = f"killed by {signal.Signals(-status).name}"
        except ValueError:
            why = f"killed by signal {-status}"
    else:
        why = f"exited with status {status}"
    return f"{why}: {last_line}" if last_line else why


class Ops(Protocol):
    """What a round does to the world; ``ProcessOps`` for real, a fake in the tests."""

    def alive(self, record: ModelRecord) -> bool: ...
    def exit_status(self, pid: int) -> int | None: ...
    def ready(self, spec: ModelSpec) -> bool: ...
    def last_line(self, spec: ModelSpec) -> str: ...
    def spawn(self, spec: ModelSpec) -> int: ...
    def stop(self, record: ModelRecord) -> bool: ...
    def publish(self, spec: ModelSpec, record: ModelRecord) -> None: ...


class Supervisor:
    def __init__(self, specs: tuple[ModelSpec, ...], ops: Ops, clock: object = time) -> None:
        self.specs = {spec.id: spec for spec in specs}
        self.ops = ops
        self.clock = clock
        self.log: Callable[[str], None] | None = None  # the watchdog's log: each change of state, with why

    def now(self) -> float:
        return float(self.clock.time())  # type: ignore[attr-defined]

    def set_state(self, record: ModelRecord, state: Lifecycle, error: str | None = None) -> None:
        changed = record.state != state or error != record.last_error
        if record.state != state:
            record.since = self.now()
            if self.log is not None:
                self.log(f"{record.id}: {state}{f' ({error})' if error else ''}")
        record.state = state
        record.last_error = error
        if changed:
            self.ops.publish(self.specs[record.id], record)

    def start(self, record: ModelRecord, state: Lifecycle = "starting") -> None:
        spec = self.specs[record.id]
        record.pid = self.ops.spawn(spec)
        record.started_at = self.now()
        record.next_restart_at = None
        record.stopped = False
        self.set_state(record, state, record.last_error if state == "restarting" else None)
        self.ops.publish(spec, record)  # the new pid

    def stop(self, record: ModelRecord) -> bool:
        gone = self.ops.stop(record)
        record.stopped = True
        record.pid = None
        record.next_restart_at = None
        self.set_state(record, "stopped")
        return gone

    def round(self, records: Mapping[str, ModelRecord]) -> None:
        for record in records.values():
            spec = self.specs.get(record.id)
            if spec is not None and spec.kind == "local" and not record.stopped and record.state != "down":
                self.check(spec, record)

    def check(self, spec: ModelSpec, record: ModelRecord) -> None:
        now = self.now()
        if record.pid is None:  # waiting out a backoff
            if record.next_restart_at is None or now >= record.next_restart_at:
                self.start(record, "restarting")
            return
        if not self.ops.alive(record):
            reason = describe_exit(self.ops.exit_status(record.pid), self.ops.last_line(spec))
            self.died(spec, record, reason, failed=self.ops.exit_status(record.pid) != 0)
            return
        if record.state in ("starting", "restarting"):
            if self.ops.ready(spec):
                self.set_state(record, "healthy")
            elif record.started_at is not None and now - record.started_at > spec.start_timeout_seconds:
                self.ops.stop(record)
                self.died(spec, record, f"not ready within {spec.start_timeout_seconds:g}s", failed=True)

    def died(self, spec: ModelSpec, record: ModelRecord, reason: str, failed: bool) -> None:
        """The process is gone: restart it later, under its policy, or call it down."""
        now = self.now()
        record.pid = None
        record.restart_times = [t for t in record.restart_times if now - t < spec.restart_window_seconds]
        if spec.restart_policy == "never" or (spec.restart_policy == "on-failure" and not failed):
            self.set_state(record, "down", f"{reason} (restart_policy {spec.restart_policy})")
            return
        if len(record.restart_times) >= spec.max_restarts:
            self.set_state(
                record,
                "down",
                f"{reason} (restarted {len(record.restart_times)} times in "
                f"{spec.restart_window_seconds:g}s: max_restarts reached)",
            )
            return
        record.restart_times.append(now)
        record.next_restart_at = now + backoff(len(record.restart_times))
        self.set_state(record, "restarting", reason)


class ProcessOps:
    """The real world: detached processes marked as this directory's, their logs, their servers' health."""

    def __init__(self, paths: RuntimePaths, folder: Path, environ: Mapping[str, str] | None = None) -> None:
        self.paths = paths
        self.folder = folder  # the config file's: a command's working directory
        self.environ = dict(os.environ if environ is None else environ)

    def alive(self, record: ModelRecord) -> bool:
        return record.pid is not None and owned(self.paths, record.id, record.pid, record.started_at)

    def exit_status(self, pid: int) -> int | None:
        return processes.exit_status(pid)

    def ready(self, spec: ModelSpec) -> bool:
        return ready(spec)

    def last_line(self, spec: ModelSpec) -> str:
        # it goes into the state file and --status: no secret value of ours or of its env, whatever it printed
        line = last_line(log_file(self.paths, spec.id))
        env = {**self.environ, **spec.env}
        for name, value in env.items():
            if len(value) >= 8 and (name in processes.OUR_SECRETS or processes.SECRET_NAME.search(name)):
                line = line.replace(value, "***")
        return line

    def spawn(self, spec: ModelSpec) -> int:
        # only what a server needs: no RunPod, proxy or Hugging Face key (processes.child_env), and none of the
        # helpers' marks (started by the watchdog, it would pass for a stray watchdog); its own env on top
        inherited = {k: v for k, v in self.environ.items() if k not in (WATCHDOG_OF, PROXY_OF, processes.HOLD_AT)}
        env = {
            **processes.child_env(inherited, secrets=("HF_TOKEN",)),
            **spec.env,
            MODEL_OF: str(self.paths.root),
            MODEL_NAME_OF: spec.id,
        }
        self.stop_leftovers(spec.id)  # a dead wrapper's server may still hold the port
        return processes.spawn_detached(
            spec.argv, env=env, log_path=log_file(self.paths, spec.id), pid_path=None, cwd=self.folder
        )

    def stop(self, record: ModelRecord) -> bool:
        gone = record.pid is None or not self.alive(record) or processes.stop(record.pid, grace=10.0)
        return self.stop_leftovers(record.id) and gone

    def stop_leftovers(self, model_id: str) -> bool:
        """Stop what the model's command started and left behind (``sh -c 'server &'``, a server whose wrapper
        was killed): they inherited its marks. True when none is left."""
        gone = True
        for pid in strays(self.paths):
            if processes.environ_value(pid, MODEL_NAME_OF) == model_id:
                gone = processes.stop(pid, grace=10.0) and gone
        return gone

    def publish(self, spec: ModelSpec, record: ModelRecord) -> None:
        pod = None
        if record.kind == "runpod":  # its pod's URL and key, for the proxy to follow a replacement
            with contextlib.suppress(ConfigError):
                pod = load_state(pod_paths(self.paths, spec.id))
        ready = pod is not None and pod.phase == "ready"
        write_state(
            state_file(self.paths, spec.id),
            BackendState(
                state=record.state,
                since=record.since,
                restarts=len(record.restart_times),
                last_error=record.last_error,
                pid=record.pid,
                cost_per_hour=record.cost_per_hour,
                base_url=pod.upstream_url if pod and ready else None,
                api_key=pod.vllm_api_key if pod and ready else None,
            ),
        )


def owned(paths: RuntimePaths, model_id: str, pid: int, started: float | None) -> bool:
    """``pid`` runs, carries this directory's and this model's marks, and started no earlier than recorded."""
    if not processes.alive(pid):
        return False
    if processes.environ_value(pid, MODEL_OF) != str(paths.root):
        return False
    if processes.environ_value(pid, MODEL_NAME_OF) != model_id:
        return False
    began = processes.started_at(pid)
    return began is None or started is None or began <= started + processes.START_SLACK


def strays(paths: RuntimePaths) -> list[int]:
    """This directory's model processes, whatever any record says (a run killed before it saved one)."""
    return [pid for pid in processes.find_by_environ(MODEL_OF, str(paths.root)) if pid != os.getpid()]


def ready(spec: ModelSpec) -> bool:
    """The server answers ``/health`` (beside ``/v1``) and ``/v1/models`` with 200."""
    assert spec.base_url is not None
    root = spec.base_url[: -len("/v1")] if spec.base_url.endswith("/v1") else spec.base_url
    try:
        with httpx.Client(timeout=2.0) as client:
            return all(client.get(url).status_code == 200 for url in (f"{root}/health", f"{spec.base_url}/models"))
    except httpx.HTTPError:
        return False


def last_line(path: Path, limit: int = 200) -> str:
    """The log's last non-blank line, cut to ``limit`` characters (the end of a file only: logs grow)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""
