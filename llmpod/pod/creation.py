"""Creating a pod: each GPU candidate in turn, every step recorded before it can bill (llmpod.pod.lifecycle).

Rules (reference: lifecycle.md section 4, runpod.md section 7): the time of each create call is saved before it is
sent; a 5xx is followed by a lookup by the pod's unique name before any retry (the pod may exist anyway); an answer
that made nothing moves on to the next candidate only when another GPU type could answer otherwise (no capacity, no
access to that pool); a pod dearer than ``max_hourly_cost`` is terminated at once and the next candidate tried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from llmpod.errors import (
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
from llmpod.pod.catalog import GpuEntry
from llmpod.pod.config import PodConfig
from llmpod.pod.fit import gpu_note
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import PodInfo, PodSpec, Provider
from llmpod.pod.state import PodState, RuntimePaths, save_state


class Creating(Protocol):
    """What creating needs of llmpod.pod.lifecycle.Session (which imports this module)."""

    @property
    def config(self) -> PodConfig: ...
    @property
    def paths(self) -> RuntimePaths: ...
    @property
    def provider(self) -> Provider: ...
    @property
    def gpus(self) -> list[GpuEntry]: ...
    @property
    def reporter(self) -> Reporter: ...
    @property
    def sleep(self) -> Callable[[float], None]: ...

    def _terminate_verified(self, pod_id: str) -> None: ...


CREATE_ATTEMPTS = 3  # per GPU type, for 5xx answers after which no pod was found by name
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


def create_with_failover(session: Creating, state: PodState, spec: PodSpec) -> PodInfo:
    """Ask for each GPU candidate in turn (one local process on a provider without GPUs), recording every step
    first; the pod, or PodError with what each candidate answered."""
    tried = []
    for gpu in session.gpus if session.provider.gpu_failover else [None]:
        gpu_spec = PodSpec(spec.name, gpu, spec.model, spec.served_model, spec.max_model_len, spec.api_key)
        label = gpu.id if gpu else "local process"
        note = gpu_note(spec.model, gpu) if gpu else None
        if note:
            session.reporter.say(note)
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            session.reporter.phase("create", f"asking for {label} (attempt {attempt})")
            state.create_sent_at = time.time()
            save_state(session.paths, state)
            try:
                pod = session.provider.create(gpu_spec)
            except ANSWERED_NOTHING_MADE as exc:
                state.create_sent_at = None  # RunPod said no: no pod of this create can appear later
                save_state(session.paths, state)
                if not isinstance(exc, NEXT_CANDIDATE):
                    raise
                if isinstance(exc, PoolForbiddenError):
                    session.reporter.say(
                        f"{label}: RunPod answered 403, this account has no access to that GPU "
                        "pool: trying the next GPU type"
                    )
                tried.append(f"{label}: {exc}")
                break
            except RunPodUnavailable as exc:
                # the create may have happened anyway: look for our unique name before trying again
                found = _find_after_failed_create(session, state.pod_name)
                if found is None:
                    tried.append(f"{label}: {exc}")
                    session.sleep(min(2.0**attempt, 10.0))
                    continue
                pod = found
            processes.checkpoint("create answered")
            _record_created(session, state, pod)
            if session.config.max_hourly_cost is not None and pod.cost_per_hour > session.config.max_hourly_cost:
                session.reporter.say(
                    f"{label} costs ${pod.cost_per_hour:.2f}/h, over max_hourly_cost: trying the next GPU type"
                )
                session._terminate_verified(pod.id)
                state.pod_id = None
                save_state(session.paths, state)
                # said in the final error too, or "every GPU too dear" would read "no GPU type to try"
                tried.append(f"{label}: ${pod.cost_per_hour:.2f}/h is over max_hourly_cost")
                break
            return pod
    raise PodError("no GPU could be had: " + "; ".join(tried) if tried else "no GPU type to try")


def _find_after_failed_create(session: Creating, name: str) -> PodInfo | None:
    for _ in range(3):
        try:
            return session.provider.find_by_name(name)
        except RunPodError:
            session.sleep(2.0)
    return None


def _record_created(session: Creating, state: PodState, pod: PodInfo) -> None:
    state.pod_id, state.phase, state.create_sent_at = pod.id, "waiting", None
    state.gpu_type_id, state.cost_per_hour, state.upstream_url = pod.gpu_id, pod.cost_per_hour, pod.url
    save_state(session.paths, state)
    session.reporter.say(
        f"created pod {pod.name} ({pod.id}) on {pod.gpu_id or 'this machine'} at ${pod.cost_per_hour:.2f}/h"
    )
