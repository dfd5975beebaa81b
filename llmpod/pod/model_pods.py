"""The RunPod entries of ``llmModels`` (issue 18): one pod per model, each kept by the single pod's rules.

Each entry with ``modelStoreId`` is a ``Session`` (llmpod.pod.lifecycle) of its own with ``helpers=False``: its
record (``pod_state.json``, 0600: it holds the pod's vLLM key), its lock and its logs are in ``.llmpod/pods/ID/``.
So, exactly as for one pod: the intent is recorded before the create call; a start that fails or is interrupted
terminates its pod; GPU failover and ``max_hourly_cost`` apply; termination is read back until confirmed; every
``llmpod-*`` pod that no record names is a leak, reported on every run and removed by ``--shutdown --all``.

What several models add:
- a pod being made holds its own lock, not the directory's, so the watchdog keeps supervising the local models
  while it loads, and knows a start whose run was killed (its lock is free while its record is not ready);
- the watchdog ends a pod at its expiry (``runtime_seconds``; a replacement keeps the expiry of the pod it
  replaces, so a flaky GPU cannot stretch the bill) or when *that model* was idle for ``idle_timeout_seconds``
  (the proxy's per-model clock): the model is then ``stopped``, with why, until ``--start`` or the next run;
- a pod that dies or is reclaimed is replaced under the entry's restart policy (llmpod.pod.supervisor).

``--local`` runs each of these entries as a local mock vLLM process instead, as it does for one pod.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout

from llmpod.backends import Backend
from llmpod.errors import ConfigError, RunPodError
from llmpod.pod.catalog import Catalog, load_catalog
from llmpod.pod.config import PodConfig
from llmpod.pod.images import cuda_floor
from llmpod.pod.lifecycle import Session, ShutdownResult
from llmpod.pod.models_config import ModelSpec
from llmpod.pod.output import clock
from llmpod.pod.preflight import check_config, make_provider
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import PodInfo, upstream_kind
from llmpod.pod.state import PodState, RuntimePaths, load_state
from llmpod.pod.supervisor import ModelRecord, Supervisor, pod_paths

__all__ = ["ModelPods", "ModelReporter"]

# the URL a RunPod model is handed to the proxy with before it ever had a pod (its state file says why it
# does not answer, so the proxy refuses at once; nothing listens on the discard port)
NO_POD_YET = "http://127.0.0.1:9/v1"


class ModelReporter(Reporter):
    """Progress lines that say which model they are about."""

    def __init__(self, model_id: str) -> None:
        super().__init__()
        self.model_id = model_id

    def say(self, message: str) -> None:
        super().say(f"{self.model_id}: {message}")

    def phase(self, phase: str, detail: str = "") -> None:
        # off a terminal a phase is a line through ``say``, which names the model already
        super().phase(phase, f"{self.model_id}: {detail}" if self.console.is_terminal else detail)


class ModelPods:
    """The sessions of every RunPod entry of the config, and of recorded ones since removed from it."""

    def __init__(
        self,
        config: PodConfig,
        config_path: Path,
        paths: RuntimePaths,
        specs: tuple[ModelSpec, ...],
        *,
        local: bool,
        creating: bool,
    ) -> None:
        self.config, self.config_path, self.paths, self.local = config, config_path, paths, local
        self.catalog = load_catalog(paths.catalog)
        self.sessions: dict[str, Session] = {}
        for spec in specs:
            if spec.kind == "runpod":
                assert spec.pod is not None
                self.sessions[spec.id] = self._session(spec.id, spec.pod, self.catalog, creating)

    def _session(self, model_id: str, pod_config: PodConfig, catalog: Catalog, creating: bool) -> Session:
        config = pod_config.model_copy(update={"provider": "local"}) if self.local else pod_config
        if creating and not self.local:  # an image of unknown CUDA: exit 2 before any network call
            cuda_floor(config.image, config.min_cuda_version, f"{self.config_path}: llmModels.{model_id}")
        reporter = ModelReporter(model_id)
        try:
            model, gpus = check_config(config, catalog, creating, reporter)
        except ConfigError as exc:  # one line that names the entry, before anything starts
            raise ConfigError(f"{self.config_path.name}: llmModels.{model_id}: {exc}") from None
        paths = pod_paths(self.paths, model_id)
        paths.ensure()
        return Session(
            config=config,
            config_path=self.config_path,
            paths=paths,
            provider=make_provider(config, paths.pod_log),
            catalog=catalog,
            model=model,
            gpus=gpus,
            reporter=reporter,
            helpers=False,
        )

    def session(self, model_id: str) -> Session:
        """The entry's session; for a record whose entry left the config, one that can only stop its pod."""
        if model_id not in self.sessions:
            self.sessions[model_id] = self._session(model_id, self.config, self.catalog, creating=False)
        return self.sessions[model_id]

    def check_access(self) -> None:
        """A missing or refused RunPod key is one line and exit 2, before anything starts."""
        first = next(iter(self.sessions.values()), None)
        if first is not None:
            first.provider.check_access()

    def close(self) -> None:
        for session in self.sessions.values():
            session.provider.close()

    # ----------------------------------------------------------------- one model
    def pod_state(self, model_id: str) -> PodState | None:
        return load_state(self.session(model_id).paths)

    def start(self, model_id: str, expires_at: float | None = None) -> bool:
        """The model's pod, ready: the recorded one if it lives, else a new one (expiring at ``expires_at``, a
        replacement's, or after its runtime_seconds). Blocks while it loads. True when made now, not reused."""
        session = self.session(model_id)
        before = load_state(session.paths)
        state = session.acquire(expires_at)
        return before is None or before.pod_id != state.pod_id

    def adopt(self, record: ModelRecord, state: PodState) -> None:
        record.pod_id, record.base_url, record.expires_at = state.pod_id, state.upstream_url, state.expires_at
        record.cost_per_hour = state.cost_per_hour or 0.0

    def stop(self, model_id: str, reason: str) -> ShutdownResult:
        """Terminate the model's pod (verified) and forget it; idempotent."""
        return self.session(model_id).shutdown(reason=reason)

    def making(self, model_id: str) -> bool:
        """A run holds the model's lock: it is making (or stopping) the pod right now."""
        lock = FileLock(str(self.session(model_id).paths.lock_file))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def backend(self, spec: ModelSpec, record: ModelRecord | None, state_file: str) -> Backend:
        """The model as the proxy sees it: its pod's URL and vLLM key once it has a pod."""
        session = self.session(spec.id)
        state = load_state(session.paths)
        ready = state if state is not None and state.phase == "ready" and state.upstream_url else None
        return Backend(
            id=spec.id,
            base_url=(ready and ready.upstream_url) or (record and record.base_url) or NO_POD_YET,
            served_model=state.served_model if state else session.model.id,
            aliases=spec.aliases,
            api_key=ready.vllm_api_key if ready else None,
            kind=upstream_kind(session.config.provider, session.config),
            state_file=state_file,
        )

    # ----------------------------------------------------------------- the watchdog's round
    def check(
        self, spec: ModelSpec, record: ModelRecord, supervisor: Supervisor, active_at: float
    ) -> Literal["replace", "adopted"] | None:
        """One look at a RunPod model (every watchdog interval): expiry, idleness, a pod gone or a start
        abandoned. "replace" when a new pod is due now (under the restart policy), "adopted" when a pod made by
        a run that has gone since is ready and must be handed to the proxy."""
        if record.stopped or record.state == "down":
            return None
        session = self.session(spec.id)
        state = load_state(session.paths)
        now = time.time()
        if state is None or state.phase in ("creating", "waiting", "terminating"):
            if state is not None and not self.making(spec.id):  # the run making or stopping it was killed
                session.shutdown(reason="start-up abandoned: the run making it is gone")
                supervisor.died(spec, record, "its start-up was abandoned (the run making it is gone)", failed=True)
            elif state is None and record.state == "healthy":
                supervisor.died(spec, record, "its pod record is gone", failed=True)
            return self._due(record, now)
        if record.state != "healthy":
            if self.making(spec.id):
                return None  # a run is still making or reusing it: it hands it over itself
            self.adopt(record, state)
            supervisor.set_state(record, "healthy")
            return "adopted"
        if now >= state.expires_at:
            why = f"expired: runtime_seconds reached at {clock(state.expires_at)}"
            self._end(spec, record, supervisor, why)
            return None
        idle_for = now - max(active_at, state.ready_at or 0.0)
        if state.idle_timeout_seconds and idle_for >= state.idle_timeout_seconds:
            why = f"idle: no answer for {idle_for:.0f}s (idle_timeout_seconds={state.idle_timeout_seconds})"
            self._end(spec, record, supervisor, why)
            return None
        assert state.pod_id is not None
        try:
            pod = session.provider.get(state.pod_id)
        except RunPodError:
            return None  # RunPod did not answer: asked again next round
        if pod is None or not pod.alive:
            session.reconcile()  # forgets it, with the reason in its last_session.json
            status = pod.status if pod else "not found"
            supervisor.died(spec, record, f"pod {state.pod_id} is gone ({status}): reclaimed or terminated", True)
            return self._due(record, now)
        return None

    def _end(self, spec: ModelSpec, record: ModelRecord, supervisor: Supervisor, why: str) -> None:
        result = self.stop(spec.id, why)
        record.stopped, record.pod_id = True, None
        spend = f" (spend ${result.spend_usd:.2f})" if result.spend_usd is not None else ""
        supervisor.set_state(record, "stopped", f"{why}{spend}: `manage_pod.py --start {spec.id}` starts it again")
        return None

    @staticmethod
    def _due(record: ModelRecord, now: float) -> Literal["replace"] | None:
        due = record.state == "restarting" and (record.next_restart_at is None or now >= record.next_restart_at)
        return "replace" if due else None

    # ----------------------------------------------------------------- every model
    def recorded_names(self, records: dict[str, ModelRecord]) -> set[str]:
        """The names and ids of every pod a record of ours names."""
        names: set[str] = set()
        for model_id in {*records, *self.sessions}:
            try:
                state = self.pod_state(model_id)
            except ConfigError:
                continue
            if state is not None:
                names.update(n for n in (state.pod_name, state.pod_id) if n)
        return names

    def leaks(self, records: dict[str, ModelRecord]) -> list[PodInfo]:
        """``llmpod-*`` pods of the account (or local pods of this machine) that no record of ours names."""
        first = next(iter(self.sessions.values()), None)
        if first is None:
            return []
        try:
            ours = first.provider.list_ours()
        except RunPodError as exc:
            first.reporter.say(f"warning: could not list pods to look for leaked ones: {exc}")
            return []
        known = self.recorded_names(records)
        return [pod for pod in ours if pod.id not in known and pod.name not in known]

    def report_leaks(self, records: dict[str, ModelRecord]) -> list[PodInfo]:
        leaks = self.leaks(records)
        for pod in leaks:
            Reporter().say(
                f"warning: pod {pod.name} ({pod.id}, {pod.status}, ${pod.cost_per_hour:.2f}/h) is not recorded "
                f"in {self.paths.run_dir / 'pods'}: remove it with `python3 manage_pod.py --shutdown --all`"
            )
        return leaks

    def terminate_all_ours(self) -> list[str]:
        """``--shutdown --all``: every ``llmpod-*`` pod, recorded or not."""
        first = next(iter(self.sessions.values()), None)
        if first is None:
            return []
        removed = []
        for pod in first.provider.list_ours():
            first._terminate_verified(pod.id)
            removed.append(pod.id)
        return removed
