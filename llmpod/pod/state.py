"""What manage_pod.py knows between runs: ``pod_state.json`` (mode 0600: it holds the pod's vLLM key), the
run directory for pid files and logs, and the lock that lets one manage_pod.py act at a time.

The record is written *before* the create call (phase ``creating``, with the pod's unique name) and
updated the moment RunPod returns an id, so a crash at any point leaves either a record or a pod whose
name carries our prefix (found by the leaked-pods listing): never a pod billing with no trace.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, field_serializer

from llmpod._files import atomic_write
from llmpod.errors import ConfigError, ForeignPodError, LlmpodError, LockBusyError

STATE_FILE = "pod_state.json"
RUN_DIR = ".llmpod"
POD_NAME_PREFIX = "llmpod-"
Phase = Literal["creating", "waiting", "ready", "terminating"]


class RuntimePaths:
    """Every file manage_pod.py writes, relative to the directory holding the config file."""

    def __init__(self, root: Path, run_dir: Path | None = None) -> None:
        """``run_dir`` given: a pod of llmModels, whose record, lock and logs are all in that folder of the
        directory's run dir (llmpod.pod.model_pods); ``root`` stays the config's folder."""
        self.root = root
        self.run_dir = run_dir or root / RUN_DIR
        self.state_file = root / STATE_FILE if run_dir is None else run_dir / STATE_FILE
        self.lock_file = self.run_dir / "manage_pod.lock"
        self.proxy_pid = self.run_dir / "proxy.pid"
        self.watchdog_pid = self.run_dir / "watchdog.pid"
        self.proxy_log = self.run_dir / "proxy.log"
        self.watchdog_log = self.run_dir / "watchdog.log"
        self.pod_log = self.run_dir / "local_pod.log"
        self.catalog = self.run_dir / "catalog.json"
        self.last_session = self.run_dir / "last_session.json"

    def ensure(self) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.run_dir.parent != self.root:  # a pod of llmModels: .llmpod/pods/ID is ours alone too
            self.run_dir.parent.chmod(0o700)


class PodState(BaseModel):
    """The one pod this directory manages."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    version: int = 1
    provider: Literal["runpod", "local"]
    phase: Phase
    pod_name: str
    pod_id: str | None = None
    gpu_type_id: str | None = None
    cost_per_hour: float | None = None
    model_id: str
    served_model: str
    vllm_api_key: SecretStr
    upstream_url: str | None = None  # the pod's OpenAI base URL, …/v1
    created_at: float
    ready_at: float | None = None
    expires_at: float
    idle_timeout_seconds: int
    proxy_port: int
    local_pid: int | None = None  # provider "local": the process standing in for the pod
    create_sent_at: float | None = None  # the last create call; until it answers, its pod may still appear

    @field_serializer("vllm_api_key", when_used="json")
    def _reveal_key(self, value: SecretStr) -> str:
        return value.get_secret_value()  # only into the 0600 state file


def save_state(paths: RuntimePaths, state: PodState) -> None:
    atomic_write(paths.state_file, state.model_dump_json(indent=2).encode() + b"\n", mode=0o600, exact_mode=True)


def load_state(paths: RuntimePaths) -> PodState | None:
    """The saved state, None when there is none. A damaged file is a one-line ConfigError."""
    try:
        raw = paths.state_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{paths.state_file}: cannot read it ({exc.strerror})") from None
    try:
        return PodState.model_validate(json.loads(raw))
    except (ValueError, ValidationError, RecursionError) as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not valid JSON"
        raise ConfigError(
            f"{paths.state_file} is damaged ({reason}); any pod it named is listed above as not recorded: "
            f"`python3 manage_pod.py --shutdown --all` removes it, and then this file"
        ) from None


class _Named(Protocol):
    @property
    def name(self) -> str: ...


def check_recorded_pod(paths: RuntimePaths, state: PodState, get: Callable[[str], _Named | None]) -> bool:
    """Refuse (``ForeignPodError``) when the recorded ``pod_id`` names a live pod whose name is not the recorded
    ``pod_name``: a hand-edited or stale file must never make us terminate another pod. True when the id was
    checked (or there is none); False when the provider could not be asked now: a failed start-up must still be
    able to remove its own pod while the API is flaky, so the caller then goes by the recorded name alone."""
    if state.pod_id is None:
        return True
    try:
        pod = get(state.pod_id)
    except LlmpodError:
        return False
    if pod is not None and pod.name != state.pod_name:
        raise ForeignPodError(
            f"{paths.state_file} names pod {state.pod_id}, but that pod is {pod.name!r}, not the recorded "
            f"{state.pod_name!r}: not terminating it (the file was edited or is stale); "
            "`python3 manage_pod.py --shutdown --all` removes this file and every llmpod-* pod"
        )
    return True


def discard_damaged_state(paths: RuntimePaths) -> bool:
    """Remove a state file that does not load; only after every pod it could name was terminated."""
    try:
        load_state(paths)
    except ConfigError:
        clear_state(paths)
        return True
    return False


def clear_state(paths: RuntimePaths) -> None:
    with contextlib.suppress(FileNotFoundError):
        paths.state_file.unlink()


def record_last_session(paths: RuntimePaths, state: PodState | None, reason: str, spend: float | None) -> None:
    """Why the last session ended, for --status after the fact."""
    paths.ensure()
    entry: dict[str, Any] = {
        "ended_at": time.time(),
        "reason": reason,
        "spend_usd": spend,
        "pod_id": state.pod_id if state else None,
        "pod_name": state.pod_name if state else None,
    }
    atomic_write(paths.last_session, json.dumps(entry, indent=2).encode() + b"\n", mode=0o600, exact_mode=True)


def read_last_session(paths: RuntimePaths) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.last_session.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def exclusive(paths: RuntimePaths, timeout: float, waiting_message: str | None = None) -> Iterator[None]:
    """Hold the directory's lock. The OS releases it when its holder dies, so a stale lock from a killed
    process is simply taken over."""
    paths.ensure()
    lock = FileLock(str(paths.lock_file), timeout=timeout)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting_message:
            print(waiting_message, file=sys.stderr)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise LockBusyError(
                f"another manage_pod.py is still working in {paths.root} (lock {paths.lock_file}); "
                "wait for it, or stop it"
            ) from None
    try:
        yield
    finally:
        lock.release()
