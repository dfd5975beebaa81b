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

from llmpod.errors import (
    CleanupFailedError,
    ConfigError,
    NoCapacityError,
    PodError,
    PoolForbiddenError,
    RunPodAuthError,
    RunPodBalanceError,
    RunPodError,
    RunPodNotFound,
    RunPodRateLimited,
    RunPodRequestError,
    RunPodUnavailable,
)
from llmpod.pod import processes
from llmpod.pod.catalog import Catalog, GpuEntry, ModelEntry
from llmpod.pod.config import PodConfig, check_port_free
from llmpod.pod.fit import gpu_note
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

CREATE_ATTEMPTS = 3  # per GPU type, for 5xx answers after which no pod was found by name
TERMINATE_DEADLINE = 180.0
# A create that never answered (timed out after the client's 30 s, or we were interrupted) may still make its
# pod: until this long after it was sent, a record without a pod id is looked for by name, not forgotten.
CREATE_SETTLE = 45.0
ANSWERED_NOTHING_MADE = (
    NoCapacityError,
    RunPodAuthError,
    RunPodBalanceError,
    RunPodRequestError,
    RunPodNotFound,
    RunPodRateLimited,
    PoolForbiddenError,
)
# answers after which the spec's create table says to try the next candidate: no capacity (400), no access to
# that GPU type's pool (403); any other refusal would fail the same way on every candidate
NEXT_CANDIDATE = (NoCapacityError, PoolForbiddenError)
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
            if state is not None and time.time() >= state.expires_at:
                self.reporter.say(f"pod {state.pod_name} passed its expiry: terminating it")
                self._terminate_recorded(state, "expired (runtime_seconds)")
                state, pod = None, None
            if state is not None and pod is not None and pod.running and state.phase == "ready":
                self.reporter.say(f"reusing pod {state.pod_name} ({state.pod_id})")
            elif state is not None:
                state = self._resume(state, pod)
            else:
                state = self._create()
            self.sidecars.ensure_proxy(state)
            self.sidecars.ensure_watchdog()
            processes.checkpoint("ready")
            return state

    def _resume(self, state: PodState, pod: PodInfo | None) -> PodState:
        """A previous run died while creating or waiting: adopt its pod if it lives, else start over."""
        deadline = state.created_at + self.config.ready_timeout_seconds
        if pod is None or not pod.alive or time.time() >= deadline:
            self.reporter.say(f"a previous run left pod {state.pod_name} unfinished: removing it and starting over")
            self._terminate_recorded(state, "abandoned while starting")
            return self._create()
        self.reporter.say(f"resuming pod {state.pod_name} ({pod.id}) left starting by a previous run")
        state.pod_id, state.phase, state.upstream_url = pod.id, "waiting", pod.url
        save_state(self.paths, state)
        return self._guarded(state, lambda: self._wait_ready(state, pod, deadline))

    def _create(self) -> PodState:
        if self.sidecars.proxy_pid() is None:
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
            expires_at=now + self.config.runtime_seconds,
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
        pod = self._create_with_failover(state, spec)
        deadline = state.created_at + self.config.ready_timeout_seconds
        return self._wait_ready(state, pod, deadline)

    def _create_with_failover(self, state: PodState, spec: PodSpec) -> PodInfo:
        tried = []
        for gpu in self.gpus if self.provider.gpu_failover else [None]:
            gpu_spec = PodSpec(spec.name, gpu, spec.model, spec.served_model, spec.max_model_len, spec.api_key)
            label = gpu.id if gpu else "local process"
            note = gpu_note(spec.model, gpu) if gpu else None
            if note:
                self.reporter.say(note)
            for attempt in range(1, CREATE_ATTEMPTS + 1):
                self.reporter.phase("create", f"asking for {label} (attempt {attempt})")
                state.create_sent_at = time.time()
                save_state(self.paths, state)
                try:
                    pod = self.provider.create(gpu_spec)
                except ANSWERED_NOTHING_MADE as exc:
                    state.create_sent_at = None  # RunPod said no: no pod of this create can appear later
                    save_state(self.paths, state)
                    if not isinstance(exc, NEXT_CANDIDATE):
                        raise
                    if isinstance(exc, PoolForbiddenError):
                        self.reporter.say(
                            f"{label}: RunPod answered 403, this account has no access to that GPU "
                            "pool: trying the next GPU type"
                        )
                    tried.append(f"{label}: {exc}")
                    break
                except RunPodUnavailable as exc:
                    # the create may have happened anyway: look for our unique name before trying again
                    found = self._find_after_failed_create(state.pod_name)
                    if found is None:
                        tried.append(f"{label}: {exc}")
                        self.sleep(min(2.0**attempt, 10.0))
                        continue
                    pod = found
                processes.checkpoint("create answered")
                self._record_created(state, pod)
                if self.config.max_hourly_cost is not None and pod.cost_per_hour > self.config.max_hourly_cost:
                    self.reporter.say(
                        f"{label} costs ${pod.cost_per_hour:.2f}/h, over max_hourly_cost: trying the next GPU type"
                    )
                    self._terminate_verified(pod.id)
                    state.pod_id = None
                    save_state(self.paths, state)
                    # said in the final error too, or "every GPU too dear" would read "no GPU type to try"
                    tried.append(f"{label}: ${pod.cost_per_hour:.2f}/h is over max_hourly_cost")
                    break
                return pod
        raise PodError("no GPU could be had: " + "; ".join(tried) if tried else "no GPU type to try")

    def _find_after_failed_create(self, name: str) -> PodInfo | None:
        for _ in range(3):
            try:
                return self.provider.find_by_name(name)
            except RunPodError:
                self.sleep(2.0)
        return None

    def _record_created(self, state: PodState, pod: PodInfo) -> None:
        state.pod_id, state.phase, state.create_sent_at = pod.id, "waiting", None
        state.gpu_type_id, state.cost_per_hour, state.upstream_url = pod.gpu_id, pod.cost_per_hour, pod.url
        save_state(self.paths, state)
        self.reporter.say(
            f"created pod {pod.name} ({pod.id}) on {pod.gpu_id or 'this machine'} at ${pod.cost_per_hour:.2f}/h"
        )

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
            if state is None:
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
