"""The project's own exceptions.

    LlmpodError                 anything we expect and can explain in one line (exit code 1)
    ├── ConfigError             a bad setting, env var, config file or state file; nothing was created (2)
    │   └── ForeignPodError     the state file's pod id names a pod of another name: it is not terminated (2)
    ├── UpstreamError           the model server failed; carries an HTTP status and an OpenAI error body
    ├── LockBusyError           another manage_pod.py holds the lock (3)
    ├── PodError                the pod could not be made ready, or could not be removed (1)
    │   ├── CrashLoopError      its container died at start (and on RunPod restarts forever): the pod was
    │   │                       terminated; the message quotes the log line that explains it (1)
    │   └── CleanupFailedError  a pod may still be billing: the message says how to remove it by hand (4)
    └── RunPodError             the RunPod API refused or failed; ``status`` is its HTTP status (1)
        ├── RunPodAuthError     401/403: missing, wrong or revoked key (2)
        ├── RunPodBalanceError  402: not enough credit (2)
        ├── NoCapacityError     400 "no longer any instances" (live) or "could not be placed" (spec): try another GPU
        ├── PoolForbiddenError  403 on create: the key works but cannot use that GPU type's pool: try another
        ├── RunPodRequestError  400/422: our request is wrong (a bug, or a bad config value)
        ├── RunPodNotFound      404
        ├── RunPodRateLimited   429 after backing off as told; ``retry_after`` seconds
        └── RunPodUnavailable   5xx, timeouts and network errors, after retrying

The CLIs catch ``LlmpodError`` in exactly one place each and turn it into a one-line message and its
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class LlmpodError(Exception):
    """An expected failure with a message fit to show the user as it is."""

    exit_code = 1


class ConfigError(LlmpodError):
    """A setting is missing or invalid; nothing was started."""

    exit_code = 2


class ForeignPodError(ConfigError):
    """pod_state.json's ``pod_id`` names a pod whose name is not the recorded one (the file was edited, or is
    stale): that pod is someone else's, and is never terminated on the file's word."""


class UpstreamError(LlmpodError):
    """The upstream model server answered with an error, or could not be reached.

    ``status`` is what the proxy answers its client with; ``body`` is already in the OpenAI error shape.
    """

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(str(body.get("error", {}).get("message", "upstream error")))
        self.status = status
        self.body = body
        self.headers = headers or {}


class LockBusyError(LlmpodError):
    """Another manage_pod.py is running (it holds the state lock)."""

    exit_code = 3


class PodError(LlmpodError):
    """The pod did not become ready, or something about it needs the user's attention."""


class CrashLoopError(PodError):
    """The pod's container dies at every start (a bad flag, out of memory, a gated model, a full disk, a CUDA
    mismatch); the message names the log line that says why."""


class CleanupFailedError(PodError):
    """A pod could not be confirmed terminated: it may still be billing."""

    exit_code = 4


class RunPodError(LlmpodError):
    """The RunPod API answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RunPodAuthError(RunPodError):
    exit_code = 2


class RunPodBalanceError(RunPodError):
    exit_code = 2


class NoCapacityError(RunPodError):
    pass


class PoolForbiddenError(RunPodError):
    """A create answered 403: the account may not use that GPU type's pool (the spec: skip it, keep going).
    Elsewhere a 403 is a ``RunPodAuthError``: a key that lacks access."""


class RunPodRequestError(RunPodError):
    pass


class RunPodNotFound(RunPodError):
    pass


class RunPodRateLimited(RunPodError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, 429)
        self.retry_after = retry_after


class RunPodUnavailable(RunPodError):
    pass
