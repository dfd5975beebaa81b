"""Waiting for a new pod to serve: poll the provider and vLLM until the model answers, and stop at once when the
pod exits at start or crash-loops (RunPod restarts a dying container, so the pod reads RUNNING and bills while
vLLM never answers: its log and uptime tell, see crashloop.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from llmpod.errors import CrashLoopError, PodError
from llmpod.pod.config import PodConfig
from llmpod.pod.crashloop import CrashLoopDetector, best_line, billed, progress_line
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import PodInfo, Provider
from llmpod.pod.state import PodState, RuntimePaths, save_state

__all__ = ["CRASH_LOG_EVERY", "CRASH_LOG_TAIL", "ReadyWait"]

# While a RunPod pod is RUNNING but vLLM does not answer, its log is read this often, this many lines (one vLLM
# crash with its tracebacks): RunPod's stream stays open, so each read costs up to RunPodClient.pod_logs's wait.
CRASH_LOG_EVERY = 3.0
CRASH_LOG_TAIL = 200


@dataclass
class ReadyWait:
    """One pod's wait. ``terminate`` is the session's verified termination, ``spend`` what the session cost so far."""

    provider: Provider
    config: PodConfig
    paths: RuntimePaths
    reporter: Reporter
    sleep: Callable[[float], None]
    terminate: Callable[[str], None]
    spend: Callable[[PodState, PodInfo], float]

    def wait(self, state: PodState, pod: PodInfo, deadline: float) -> PodState:
        """Poll until vLLM serves the model; raise (the caller terminates the pod) on a crash, exit or timeout."""
        started = time.monotonic()
        interval = 0.5
        last: list[str] = []
        logs_at = 0.0
        assert state.pod_id is not None
        watch = CrashLoopDetector(
            [
                state.vllm_api_key.get_secret_value(),
                os.environ.get(self.config.hf_token_env, ""),
                os.environ.get("RUNPOD_API_KEY", ""),
            ]
        )
        while True:
            info = self.provider.get(state.pod_id)
            if info is None or not info.alive:
                tail = self.provider.logs(state.pod_id, CRASH_LOG_TAIL)
                status = info.status if info else "gone"
                why = best_line(tail, watch.secrets)  # a container that died at start: say what it printed
                if why is not None:
                    raise CrashLoopError(
                        f"pod {state.pod_name} exited at start" + (f" ({status})" if info else "") + f": {why}"
                    )
                shown = "; ".join(tail[-5:])
                raise PodError(
                    f"pod {state.pod_name} stopped while starting ({status})"
                    + (f"; last log lines: {shown}" if shown else "")
                )
            if info.running and self._vllm_ready(info.url, state):
                break
            phase = "loading model" if info.running else info.status.lower()
            if self.provider.reads_crash_loops and info.running:
                # RunPod restarts a container that dies: the pod reads RUNNING and bills while vLLM never answers
                watch.uptime(info.uptime_seconds)
                if time.monotonic() - logs_at >= CRASH_LOG_EVERY:
                    window, logs_at = self.provider.logs(state.pod_id, CRASH_LOG_TAIL), time.monotonic()
                    watch.window(window)
                    last = [line] if (line := progress_line(window, watch.secrets)) else last
                self._give_up_on_crash_loop(state, info, watch)
            elif self.provider.shows_start_log and time.monotonic() - logs_at >= self.reporter.heartbeat:
                # RunPod's log stream stays open: reading it costs seconds and rate limit, so not every poll
                last, logs_at = self.provider.logs(state.pod_id, 1) or last, time.monotonic()
            self.reporter.phase(
                phase,
                f"{time.monotonic() - started:.0f}s, ${info.cost_per_hour:.2f}/h"
                + (f" | {last[-1][:120]}" if last else ""),
            )
            if time.time() >= deadline:
                raise PodError(
                    f"pod {state.pod_name} was not ready within ready_timeout_seconds="
                    f"{self.config.ready_timeout_seconds}"
                )
            self.sleep(interval)
            interval = min(interval * 1.5, 5.0)
        state.phase, state.ready_at, state.upstream_url = "ready", time.time(), info.url
        save_state(self.paths, state)
        self.reporter.say(f"vLLM is serving {state.served_model} after {time.monotonic() - started:.0f}s")
        return state

    def _give_up_on_crash_loop(self, state: PodState, info: PodInfo, watch: CrashLoopDetector) -> None:
        """On clear evidence of a crash loop, terminate the pod at once (verified) and say why in one line."""
        verdict = watch.verdict()
        if verdict is None:
            return
        assert state.pod_id is not None
        self.terminate(state.pod_id)
        spent = billed(time.time() - state.created_at, self.spend(state, info))
        raise CrashLoopError(f"pod {state.pod_name} crash-loops: {verdict.line} (terminated after {spent})")

    def _vllm_ready(self, url: str, state: PodState) -> bool:
        """vLLM's /health answers 200 and /v1/models lists our model (502 or refused while it loads)."""
        root = url[: -len("/v1")]
        headers = {"Authorization": f"Bearer {state.vllm_api_key.get_secret_value()}"}
        try:
            with httpx.Client(timeout=10.0) as http:
                if http.get(f"{root}/health").status_code != 200:
                    return False
                models = http.get(f"{url}/models", headers=headers)
        except httpx.HTTPError:
            return False
        if models.status_code == 401:
            raise PodError("vLLM refused the key this program gave it (VLLM_API_KEY); the pod is misconfigured")
        try:
            return any(m.get("id") == state.served_model for m in models.json().get("data", []))
        except (ValueError, AttributeError):
            return False
