"""An in-memory provider and a fake clock, so the lifecycle's decisions run in-process in milliseconds.

``FakeProvider`` implements ``llmpod.pod.providers.base.Provider`` over a dict of pods and a ``FakeClock``: a
pod's phases, a crash loop's lives and its uptime all follow that clock, which only moves when the code under
test sleeps. Behaviours are scripted by plain attributes (set them before the call under test), so a new one is
one attribute and a few lines; capability attributes a provider may grow (``gpu_failover`` and the like) are
set the same way. The HTTP-level fake RunPod (tests/fakes/fake_runpod.py) stays the proof that the real client reads
RunPod right; this one is for the lifecycle's logic.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmpod.errors import NoCapacityError, PoolForbiddenError, RunPodUnavailable
from llmpod.pod.providers import PodInfo, PodSpec

BANNER = "INFO 01-01 00:00:00 [api_server.py:1839] vLLM API server version 0.33.0"
EXITED = "Container exited with status 1"


class FakeClock:
    """Wall and monotonic time that advance only by ``sleep`` (or ``advance``): loops over minutes take none."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass
class FakePod:
    id: str
    name: str
    gpu_id: str | None
    cost_per_hour: float
    created: float
    status: str = "RUNNING"
    running_at: float = 0.0
    # a crash loop: each life lasts ``crash_every`` seconds and prints the banner, ``crash_lines`` and an exit
    crash_lines: list[str] = field(default_factory=list)
    crash_every: float = 0.0


@dataclass
class FakeProvider:
    """Pods in a dict; every behaviour below is off until a test sets it."""

    clock: FakeClock
    kind: str = "runpod"
    # what the lifecycle asks of a backend (llmpod.pod.providers.base.Provider): RunPod's answers by default
    gpu_failover: bool = True
    reads_crash_loops: bool = True
    shows_start_log: bool = True
    create_may_land_late: bool = True
    cost_per_hour: dict[str, float] = field(default_factory=dict)  # per GPU id; others cost ``default_cost``
    default_cost: float = 0.5
    starting_seconds: float = 0.0  # STARTING before RUNNING
    ready_seconds: float = 0.0  # RUNNING before vLLM answers (see ``vllm_ready``)
    no_capacity: set[str] = field(default_factory=set)  # GPU ids whose create answers "no instances available"
    forbidden: set[str] = field(default_factory=set)  # GPU ids whose create answers 403 (pool forbidden)
    create_5xx_made: int = 0  # the next N creates answer 5xx though each made its pod
    create_5xx_nothing: int = 0  # the next N creates answer 5xx and made nothing
    create_timeout_made_after: float | None = None  # the next create times out; its pod appears this much later
    terminate_failures: int = 0  # the next N terminate calls answer 5xx (the pod stays)
    terminate_ignored: bool = False  # terminate answers OK but the pod never goes
    list_failures: int = 0  # the next N list/find calls answer 5xx
    get_failures: int = 0  # the next N get calls answer 5xx
    crash_lines: list[str] = field(default_factory=list)  # new pods crash-loop printing these
    crash_every: float = 0.0  # seconds per life of a crash-looping container
    exits_at_start: bool = False  # new pods end EXITED at once (a local process that dies at start)
    pods: dict[str, FakePod] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    closed: bool = False
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _pending: list[tuple[float, PodSpec]] = field(default_factory=list)  # creates that time out, then land

    # ------------------------------------------------------------------ scripting helpers
    def add_pod(self, name: str, gpu_id: str | None = "NVIDIA L40S") -> FakePod:
        """A pod made outside this session (a leak, or one RunPod made after a create that timed out)."""
        pod = FakePod(
            f"pod{next(self._ids)}",
            name,
            gpu_id,
            self._cost(gpu_id),
            self.clock.time(),
            running_at=self.clock.time() + self.starting_seconds,
        )
        if self.starting_seconds:
            pod.status = "STARTING"
        self.pods[pod.id] = pod
        return pod

    def reclaim(self, pod_id: str) -> None:
        """RunPod takes the pod back (spot reclaim, or terminated from the console)."""
        self.pods.pop(pod_id, None)

    def live(self) -> list[str]:
        self._land_pending()
        return list(self.pods)

    def vllm_ready(self, url: str) -> bool:
        """What the lifecycle's health check would see at ``url`` (patched over ``Session._vllm_ready``)."""
        pod = next((p for p in self.pods.values() if self._url(p.id) == url), None)
        if pod is None or pod.crash_lines or pod.crash_every:
            return False
        self._advance(pod)
        return pod.status == "RUNNING" and self.clock.time() >= pod.running_at + self.ready_seconds

    # ------------------------------------------------------------------ the Provider protocol
    def check_access(self) -> None:
        self.calls["check_access"] += 1

    def create(self, spec: PodSpec) -> PodInfo:
        self.calls["create"] += 1
        gpu = spec.gpu.id if spec.gpu else None
        if gpu in self.no_capacity:
            raise NoCapacityError("There are no longer any instances available with the requested specifications.", 400)
        if gpu in self.forbidden:
            raise PoolForbiddenError("Your account cannot access the requested pool.", 403)
        if self.create_5xx_nothing:
            self.create_5xx_nothing -= 1
            raise RunPodUnavailable("create pod: HTTP 500", 500)
        if self.create_timeout_made_after is not None:
            self._pending.append((self.clock.time() + self.create_timeout_made_after, spec))
            self.create_timeout_made_after = None
            raise RunPodUnavailable("create pod: timed out", None)
        pod = self._make(spec)
        if self.create_5xx_made:
            self.create_5xx_made -= 1
            raise RunPodUnavailable("create pod: HTTP 502", 502)
        return self._info(pod)

    def get(self, pod_id: str) -> PodInfo | None:
        self.calls["get"] += 1
        if self.get_failures:
            self.get_failures -= 1
            raise RunPodUnavailable(f"get pod {pod_id}: HTTP 502", 502)
        self._land_pending()
        pod = self.pods.get(pod_id)
        return None if pod is None else self._info(pod)

    def find_by_name(self, name: str) -> PodInfo | None:
        return next((p for p in self.list_ours() if p.name == name), None)

    def list_ours(self) -> list[PodInfo]:
        self.calls["list_ours"] += 1
        if self.list_failures:
            self.list_failures -= 1
            raise RunPodUnavailable("list pods: HTTP 503", 503)
        self._land_pending()
        return [self._info(p) for p in self.pods.values() if p.name.startswith("llmpod-")]

    def terminate(self, pod_id: str) -> bool:
        self.calls["terminate"] += 1
        if self.terminate_failures:
            self.terminate_failures -= 1
            raise RunPodUnavailable(f"delete pod {pod_id}: HTTP 500", 500)
        if self.terminate_ignored:
            return True
        return self.pods.pop(pod_id, None) is not None

    def logs(self, pod_id: str, tail: int) -> list[str]:
        self.calls["logs"] += 1
        pod = self.pods.get(pod_id)
        return [] if pod is None else self._log_lines(pod)[-tail:]

    def follow_logs(self, pod_id: str) -> Iterator[str]:
        yield from self.logs(pod_id, 100)

    def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------------ inside
    def _cost(self, gpu_id: str | None) -> float:
        return self.cost_per_hour.get(gpu_id or "", self.default_cost)

    def _url(self, pod_id: str) -> str:
        return f"http://{pod_id}.fake.invalid/v1"

    def _make(self, spec: PodSpec) -> FakePod:
        pod = self.add_pod(spec.name, spec.gpu.id if spec.gpu else None)
        pod.crash_lines, pod.crash_every = list(self.crash_lines), self.crash_every
        if self.exits_at_start:
            pod.status = "EXITED"
        return pod

    def _land_pending(self) -> None:
        landed = [(at, spec) for at, spec in self._pending if at <= self.clock.time()]
        for item in landed:
            self._pending.remove(item)
            self._make(item[1])

    def _advance(self, pod: FakePod) -> None:
        if pod.status == "STARTING" and self.clock.time() >= pod.running_at:
            pod.status = "RUNNING"

    def _uptime(self, pod: FakePod) -> int | None:
        if pod.status != "RUNNING":
            return None
        alive = self.clock.time() - pod.running_at
        return int(alive % pod.crash_every) if pod.crash_every else int(alive)

    def _log_lines(self, pod: FakePod) -> list[str]:
        if not pod.crash_every:
            return [BANNER, *pod.crash_lines] if pod.crash_lines or pod.status == "EXITED" else [BANNER]
        lives = int(max(0.0, self.clock.time() - pod.running_at) // pod.crash_every) + 1
        lines: list[str] = []
        for life in range(lives):
            lines += [BANNER, *pod.crash_lines] + ([EXITED] if life < lives - 1 else [])
        return lines

    def _info(self, pod: FakePod) -> PodInfo:
        self._advance(pod)
        return PodInfo(
            pod.id, pod.name, pod.status, pod.cost_per_hour, pod.gpu_id, self._uptime(pod), self._url(pod.id)
        )
