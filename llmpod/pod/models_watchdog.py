"""The watchdog with ``llmModels`` (issue 18): a detached ``manage_pod.py --watchdog`` that supervises every model.

Every second (local checks only: pids, state files, the config) a supervisor round restarts dead local models
under their policy (llmpod.pod.supervisor) and restarts the proxy if it died. Every ``watchdog_interval_seconds``
each RunPod model is looked at too (llmpod.pod.model_pods: expiry, its own idleness, a pod gone, a start
abandoned). A pod due to be replaced is made in a thread of this process, under the model's own lock, while the
rounds go on; the proxy is then restarted with the new pod's URL (its requests in flight finish first). A
``--shutdown`` stops this process first, thread included, and then terminates whatever pod it was making.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

from llmpod.errors import CleanupFailedError, ConfigError, LlmpodError
from llmpod.pod import processes
from llmpod.pod.models_config import ModelSpec
from llmpod.pod.models_rig import Rig, ensure_proxy, pod_ready, record_of, rig
from llmpod.pod.state import exclusive
from llmpod.pod.supervisor import ModelsState, load_models_state, save_models_state

__all__ = ["watch"]

LOCK_WAIT = 120.0
SUPERVISE_EVERY = 1.0  # seconds between two supervisor rounds, at most


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} watchdog: {message}", flush=True)


class Watch:
    """The loop's memory across rounds: replacements under way, each model's last activity, the last pod check."""

    def __init__(self) -> None:
        self.replacing: dict[str, threading.Thread] = {}
        self.active_at: dict[str, float] = {}
        self.started = time.time()
        self.pods_checked = 0.0

    def activity(self, per_model: dict[str, Any], model_id: str, now: float) -> float:
        """The model's last activity as the proxy's per-model figures tell (kept here: a proxy restart resets
        them); a request in flight is activity, as for one pod."""
        figures = per_model.get(model_id)
        seen = self.active_at.get(model_id, self.started)
        if isinstance(figures, dict):
            if figures.get("in_flight"):
                seen = now
            if isinstance(figures.get("last_request_at"), int | float):
                seen = max(seen, float(figures["last_request_at"]))
        self.active_at[model_id] = seen
        return seen

    def pods_round(self, r: Rig, state: ModelsState) -> bool:
        """Each RunPod model, at most every watchdog interval; True when the proxy must be handed a new pod."""
        now = time.time()
        if not r.pods.sessions or now - self.pods_checked < float(r.config.watchdog_interval_seconds):
            return False
        self.pods_checked = now
        per_model = (r.sidecars.proxy_metrics() or {}).get("models")  # once a round, for every model
        per_model = per_model if isinstance(per_model, dict) else {}
        changed = False
        for spec in r.specs:
            if spec.kind != "runpod" or spec.id in self.replacing or spec.id not in state.models:
                continue
            record = state.models[spec.id]
            try:
                outcome = r.pods.check(spec, record, r.supervisor, self.activity(per_model, spec.id, now))
            except CleanupFailedError as exc:
                r.supervisor.set_state(record, "down", str(exc))  # never replaced while one may still bill
                continue
            except LlmpodError as exc:
                _log(f"{spec.id}: check failed, will retry: {exc}")
                continue
            changed = changed or outcome == "adopted"
            if outcome == "replace":
                self.replace(r, spec)
        return changed

    def replace(self, r: Rig, spec: ModelSpec) -> None:
        _log(f"{spec.id}: making a new pod")
        thread = threading.Thread(target=self._replacement, args=(r, spec), name=f"replace {spec.id}", daemon=True)
        self.replacing[spec.id] = thread
        thread.start()

    def _replacement(self, r: Rig, spec: ModelSpec) -> None:
        try:
            with exclusive(r.paths, LOCK_WAIT):
                state = load_models_state(r.paths)
                record = state.models.get(spec.id) if state else None
                if state is None or record is None or record.stopped or record.state != "restarting":
                    return
                if record.expires_at is not None and time.time() >= record.expires_at:
                    record.stopped = True
                    r.supervisor.set_state(record, "stopped", "expired (runtime_seconds) before it could be replaced")
                    save_models_state(r.paths, state)
                    return
                expires_at = record.expires_at  # the replaced pod's: a flaky GPU does not stretch the bill
            failure: LlmpodError | None = None
            try:
                r.pods.start(spec.id, expires_at)  # under the model's own lock: the rounds go on meanwhile
            except LlmpodError as exc:
                failure = exc
            with exclusive(r.paths, LOCK_WAIT):
                state = load_models_state(r.paths)
                if state is None:  # shut down meanwhile: the pod made goes too
                    r.pods.stop(spec.id, "made after a shutdown")
                    return
                record = record_of(state, spec)
                if record.stopped:
                    r.pods.stop(spec.id, f"--stop {spec.id} while it was being replaced")
                elif isinstance(failure, CleanupFailedError):  # never replaced while one may still bill
                    r.supervisor.set_state(record, "down", str(failure))
                elif failure is not None:
                    r.supervisor.died(spec, record, str(failure), failed=True)
                else:
                    pod_ready(r, record)
                    _log(f"{spec.id}: replaced by pod {record.pod_id} (${record.cost_per_hour:.2f}/h)")
                save_models_state(r.paths, state)
                ensure_proxy(r)
        except LlmpodError as exc:
            _log(f"{spec.id}: replacement failed, will retry: {exc}")
        finally:
            self.replacing.pop(spec.id, None)


def _mtime(r: Rig) -> float | None:
    try:
        return r.config_path.stat().st_mtime
    except OSError:
        return None


def watch(r: Rig, args: argparse.Namespace) -> int:
    """The watchdog's loop with llmModels. The config is read again each round (a model added by hand and started
    with --start is supervised too); while it does not load, the last good one is used."""
    # a dead local model is restarted within the supervisor's first backoff (1 s), not at the next 30 s interval
    interval = min(float(r.config.watchdog_interval_seconds), SUPERVISE_EVERY)
    pid_file = r.paths.watchdog_pid
    memory = Watch()
    read_at = _mtime(r)
    try:
        while True:
            if _mtime(r) != read_at:  # built again only when edited: a rig holds a RunPod client per pod
                read_at = _mtime(r)
                try:
                    r = rig(args, "watchdog")
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
                    handed = memory.pods_round(r, state)
                    save_models_state(r.paths, state)
                    if handed or r.sidecars.proxy_pid() is None:
                        _log("the proxy is not running: restarting it" if not handed else "handing the proxy a pod")
                        ensure_proxy(r)
            except LlmpodError as exc:  # a busy lock, a proxy that would not start: try again next round
                _log(f"round failed, will retry: {exc}")
            time.sleep(interval)
    finally:
        if processes.read_pid(pid_file) == os.getpid():
            pid_file.unlink(missing_ok=True)
