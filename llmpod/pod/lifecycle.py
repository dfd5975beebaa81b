"""The pod's life: reconcile, create (recording first), wait until vLLM answers, serve, shut down.

Rules that keep users' bills safe (reference: lifecycle.md section 4, runpod.md section 7):
* the intent (unique prefixed name) is saved before the create call, the id the moment RunPod returns it;
* anything that goes wrong (an exception, Ctrl-C, SIGTERM) while creating or waiting terminates the pod;
* a 5xx on create is followed by a lookup by name before any retry (the pod may exist anyway);
* termination is verified by reading the pod back, retried for a bounded time, and reported loudly if
  it cannot be confirmed; RunPod, not the state file, is the truth about what runs.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmpod.errors import CleanupFailedError, ConfigError, PodError, RunPodError
from llmpod.pod import processes
from llmpod.pod.catalog import Catalog, GpuEntry, ModelEntry
from llmpod.pod.config import PodConfig, check_port_free
from llmpod.pod.creation import create_with_failover
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import PodInfo, PodSpec, Provider
from llmpod.pod.sidecars import Sidecars
from llmpod.pod.state import (
    POD_NAME_PREFIX,
    PodState,
    RuntimePaths,
    check_recorded_pod,
    clear_state,
    exclusive,
    load_state,
    record_last_session,
    save_state,
)
from llmpod.pod.waiting import ReadyWait

TERMINATE_DEADLINE = 180.0
# A create that never answered (timed out after the client's 30 s, or we were interrupted) may still make its
# pod: until this long after it was sent, a record without a pod id is looked for by name, not forgotten.
CREATE_SETTLE = 45.0
LOCK_WAIT = 3600.0  # a second manage_pod.py waits for the first to finish creating, then reuses its pod


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class ShutdownResult:
    """What ``Session.shutdown`` did: the pods it terminated, what the recorded session cost, and why."""

    terminated: list[str]
    spend_usd: float | None  # None when no session was recorded
    reason: str
    had_state: bool


@dataclass
class Session:
    config: PodConfig
    config_path: Path
    paths: RuntimePaths
    provider: Provider
    catalog: Catalog
    model: ModelEntry
    gpus: list[GpuEntry]
    reporter: Reporter = field(default_factory=Reporter)
    sleep: Callable[[float], None] = time.sleep
    # the directory's proxy and watchdog are this session's to start and stop: not for a pod of llmModels,
    # one of several models whose proxy and watchdog llmpod.pod.multi keeps
    helpers: bool = True
    sidecars: Sidecars = field(init=False)

    def __post_init__(self) -> None:
        self.sidecars = Sidecars(self.config, self.config_path, self.paths, self.reporter, self.catalog)

    # ----------------------------------------------------------------- reconcile
    def reconcile(self) -> tuple[PodState | None, PodInfo | None]:
        """The saved state checked against the provider; a state whose pod is gone is cleared."""
        state = load_state(self.paths)
        if state is None:
            return None, None
        pod = self.provider.get(state.pod_id) if state.pod_id else self.provider.find_by_name(state.pod_name)
        if pod is None and state.phase != "creating":
            self.reporter.say(
                f"pod {state.pod_name} ({state.pod_id}) no longer exists (terminated or reclaimed "
                "by RunPod); forgetting it"
            )
            if self.helpers:
                self.sidecars.stop()
            record_last_session(self.paths, state, "pod disappeared", None)
            clear_state(self.paths)
            return None, None
        return state, pod

    def leaked(self, known: PodState | None) -> list[PodInfo]:
        """Pods carrying our prefix that this directory's state does not know."""
        try:
            ours = self.provider.list_ours()
        except RunPodError as exc:
            self.reporter.say(f"warning: could not list pods to look for leaked ones: {exc}")
            return []
        if known is None:
            return ours
        # by id once it is known: a second pod with the recorded name (a create retried after a 5xx or a
        # time-out that made one after all) is a leak too
        return [p for p in ours if p.id != known.pod_id and (known.pod_id is not None or p.name != known.pod_name)]

    def report_leaks(self, known: PodState | None) -> list[PodInfo]:
        leaks = self.leaked(known)
        for pod in leaks:
            self.reporter.say(
                f"warning: pod {pod.name} ({pod.id}, {pod.status}, ${pod.cost_per_hour:.2f}/h) is not "
                f"recorded in {self.paths.state_file}: remove it with "
                "`python3 manage_pod.py --shutdown --all`"
            )
        return leaks

    # ----------------------------------------------------------------- up
    def up(self) -> PodState:
        """Reuse the recorded pod if it lives, else create one; then make sure proxy and watchdog run."""
        processes.checkpoint("config loaded")
        waiting = "waiting for another manage_pod.py in this directory to finish…"
        with exclusive(self.paths, LOCK_WAIT, waiting), self.reporter:
            state, pod = self.reconcile()
            self.report_leaks(state)
            state = self._ready_pod(state, pod)
            self.sidecars.ensure_proxy(state)
            self.sidecars.ensure_watchdog()
            processes.checkpoint("ready")
            return state

    def acquire(self, expires_at: float | None = None) -> PodState:
        """A pod of llmModels (``helpers`` False): the recorded one if it lives, else a new one expiring at
        ``expires_at`` (a replacement keeps the expiry of the pod it replaces); ready, with no proxy or watchdog."""
        with exclusive(self.paths, LOCK_WAIT), self.reporter:
            state, pod = self.reconcile()
            return self._ready_pod(state, pod, expires_at)

    def _ready_pod(self, state: PodState | None, pod: PodInfo | None, expires_at: float | None = None) -> PodState:
        if state is not None and time.time() >= state.expires_at:
            self.reporter.say(f"pod {state.pod_name} passed its expiry: terminating it")
            self._terminate_recorded(state, "expired (runtime_seconds)")
            state, pod = None, None
        if state is not None and pod is not None and pod.running and state.phase == "ready":
            self.reporter.say(f"reusing pod {state.pod_name} ({state.pod_id})")
            return state
        if state is not None:
            return self._resume(state, pod, expires_at)
        return self._create(expires_at)

    def _resume(self, state: PodState, pod: PodInfo | None, expires_at: float | None = None) -> PodState:
        """A previous run died while creating or waiting: adopt its pod if it lives, else start over."""
        deadline = state.created_at + self.config.ready_timeout_seconds
        if pod is None or not pod.alive or time.time() >= deadline:
            self.reporter.say(f"a previous run left pod {state.pod_name} unfinished: removing it and starting over")
            self._terminate_recorded(state, "abandoned while starting")
            return self._create(expires_at)
        self.reporter.say(f"resuming pod {state.pod_name} ({pod.id}) left starting by a previous run")
        state.pod_id, state.phase, state.upstream_url = pod.id, "waiting", pod.url
        save_state(self.paths, state)
        return self._guarded(state, lambda: self._wait_ready(state, pod, deadline))

    def _create(self, expires_at: float | None = None) -> PodState:
        if self.helpers and self.sidecars.proxy_pid() is None:
            check_port_free(self.config.proxy_port)  # before anything is created or billed
        now = time.time()
        max_len = self.config.max_model_len or self.model.context_length
        state = PodState(
            provider=self.provider.kind,
            phase="creating",
            pod_name=f"{POD_NAME_PREFIX}{uuid.uuid4().hex[:8]}",
            model_id=self.model.id,
            served_model=self.model.id,
            vllm_api_key=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=expires_at or now + self.config.runtime_seconds,
            idle_timeout_seconds=self.config.idle_timeout_seconds,
            proxy_port=self.config.proxy_port,
        )
        save_state(self.paths, state)  # the intent, before anything can bill
        processes.checkpoint("intent written")
        spec = PodSpec(
            state.pod_name, None, self.model, state.served_model, max_len, state.vllm_api_key.get_secret_value()
        )
        return self._guarded(state, lambda: self._create_and_wait(state, spec))

    def _guarded(self, state: PodState, work: Callable[[], PodState]) -> PodState:
        """Run ``work``; on any failure or interruption, terminate the pod it was making."""
        try:
            return work()
        except BaseException as exc:
            why = "interrupted" if isinstance(exc, KeyboardInterrupt | SystemExit) else f"failed: {exc}"
            self.reporter.say(f"start-up {why.split(':')[0]}: terminating pod {state.pod_name} so it stops billing")
            try:
                with _uninterruptible():  # a second Ctrl-C must not abandon the pod half-terminated
                    self._terminate_recorded(state, f"start-up {why}")
            except CleanupFailedError as cleanup:
                raise cleanup from exc
            raise

    def _create_and_wait(self, state: PodState, spec: PodSpec) -> PodState:
        pod = create_with_failover(self, state, spec)
        deadline = state.created_at + self.config.ready_timeout_seconds
        return self._wait_ready(state, pod, deadline)

    def _wait_ready(self, state: PodState, pod: PodInfo, deadline: float) -> PodState:
        waiter = ReadyWait(
            self.provider,
            self.config,
            self.paths,
            self.reporter,
            self.sleep,
            terminate=self._terminate_verified,
            spend=self.spend,
        )
        return waiter.wait(state, pod, deadline)

    # ----------------------------------------------------------------- shutdown
    def spend(self, state: PodState, pod: PodInfo | None = None) -> float:
        rate = pod.cost_per_hour if pod and pod.cost_per_hour else (state.cost_per_hour or 0.0)
        return rate * max(0.0, time.time() - state.created_at) / 3600

    def shutdown(
        self, *, all_ours: bool = False, reason: str = "requested", from_watchdog: bool = False
    ) -> ShutdownResult:
        """Terminate the recorded pod (and with ``all_ours`` every pod with our prefix), stop the helpers,
        forget the state. Idempotent. The cache is kept."""
        with exclusive(self.paths, 60.0, "waiting for another manage_pod.py in this directory…"):
            try:
                state = load_state(self.paths)
            except ConfigError:
                if not all_ours:
                    raise
                state = None
            removed: list[str] = []
            spend = None
            if state is not None:
                spend = self.spend(state)  # the recorded rate: a flaky GET must not stop a shutdown
                removed += self._terminate_recorded(state, reason, keep_watchdog=from_watchdog)
            if all_ours:
                for pod in self.provider.list_ours():
                    self._terminate_verified(pod.id)
                    removed.append(pod.id)
            if state is None and self.helpers:
                self.sidecars.stop(keep_watchdog=from_watchdog)
            return ShutdownResult(removed, spend, reason, had_state=state is not None)

    def _terminate_recorded(self, state: PodState, reason: str, keep_watchdog: bool = False) -> list[str]:
        checked = check_recorded_pod(self.paths, state, self.provider.get)  # before anything changes
        state.phase = "terminating"
        save_state(self.paths, state)
        processes.checkpoint("terminating")
        removed = self._pods_of(state, trust_id=checked)
        spend = self.spend(state) if removed else 0.0
        for pod_id in removed:
            self._terminate_verified(pod_id)
        if self.helpers:
            self.sidecars.stop(keep_watchdog=keep_watchdog)
        record_last_session(self.paths, state, reason, spend)
        clear_state(self.paths)
        return removed

    def _pods_of(self, state: PodState, trust_id: bool = True) -> list[str]:
        """The recorded pod (unless its name could not be checked) and every live pod with the record's unique
        name: a create killed before its answer, or one that answered 5xx or timed out and was retried, may have
        made one after all."""
        named = [p.id for p in self.provider.list_ours() if p.name == state.pod_name]
        sent = state.create_sent_at
        if state.pod_id is None and sent is not None and not named and self.provider.create_may_land_late:
            settle_until = sent + CREATE_SETTLE
            if time.time() < settle_until:
                self.reporter.say(
                    f"the create of pod {state.pod_name} was never answered: watching for that pod for "
                    f"up to {settle_until - time.time():.0f}s so that it cannot bill unseen"
                )
            while not named and time.time() < settle_until:
                self.sleep(1.0)
                named = [p.id for p in self.provider.list_ours() if p.name == state.pod_name]
        return list(dict.fromkeys([state.pod_id, *named] if state.pod_id and trust_id else named))

    def _terminate_verified(self, pod_id: str) -> None:
        """DELETE, then read back until the pod is gone; retried for a bounded time, loud if it never goes."""
        deadline = time.monotonic() + TERMINATE_DEADLINE
        delay, last_error = 1.0, ""
        while time.monotonic() < deadline:
            try:
                self.provider.terminate(pod_id)
                if self.provider.get(pod_id) is None:
                    return
            except RunPodError as exc:
                last_error = str(exc)
            self.sleep(delay)
            delay = min(delay * 2, 15.0)
        raise CleanupFailedError(
            f"pod {pod_id} could not be confirmed terminated ({last_error or 'it still exists'}); it may still be "
            f"billing: terminate it at https://console.runpod.io/pods, then run `python3 manage_pod.py --shutdown`"
        )

    # ----------------------------------------------------------------- small commands
    def extend(self, seconds: int) -> PodState:
        with exclusive(self.paths, 60.0):
            state = load_state(self.paths)
            if state is None:
                raise PodError("no pod to extend: start one with `python3 manage_pod.py`")
            state.expires_at = max(state.expires_at, time.time()) + seconds
            save_state(self.paths, state)
            return state
