"""pod_state.json and the directory lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmpod.errors import ConfigError, LockBusyError
from llmpod.pod.state import PodState, RuntimePaths, clear_state, exclusive, load_state, save_state

SECRET = "vllm-key-0123456789abcdef"


def make_state(**overrides: object) -> PodState:
    values: dict[str, object] = dict(
        provider="runpod",
        phase="creating",
        pod_name="llmpod-1234abcd",
        model_id="m",
        served_model="m",
        vllm_api_key=SECRET,
        created_at=1.0,
        expires_at=2.0,
        idle_timeout_seconds=0,
        proxy_port=8000,
    )
    values.update(overrides)
    return PodState(**values)  # type: ignore[arg-type]


def test_round_trip_with_the_key_only_in_the_0600_file(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path)
    paths.ensure()
    state = make_state(pod_id="abc", phase="ready")
    save_state(paths, state)
    assert oct(paths.state_file.stat().st_mode)[-3:] == "600"
    assert json.loads(paths.state_file.read_text())["vllm_api_key"] == SECRET
    assert SECRET not in repr(state) and SECRET not in str(state)
    loaded = load_state(paths)
    assert loaded is not None and loaded.pod_id == "abc"
    assert loaded.vllm_api_key.get_secret_value() == SECRET
    assert not list(tmp_path.glob(".pod_state.json.*"))  # no temp file left
    clear_state(paths)
    assert load_state(paths) is None


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"provider": "aws"}', b"\xff\xfe", b'{"version": 1}'])
def test_damaged_state_is_a_one_line_config_error(tmp_path: Path, content: bytes) -> None:
    paths = RuntimePaths(tmp_path)
    paths.state_file.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_state(paths)
    assert "\n" not in str(caught.value)
    assert "--shutdown --all" in str(caught.value)


def test_lock_is_exclusive(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path)
    with exclusive(paths, 1.0), pytest.raises(LockBusyError), exclusive(RuntimePaths(tmp_path), 0.2):
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path)
    paths.ensure()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from filelock import FileLock\n"
                f"lock = FileLock({str(paths.lock_file)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusyError), exclusive(paths, 0.2):
            pass
        holder.kill()
        holder.wait(timeout=10)
        started = time.monotonic()
        with exclusive(paths, 5.0):
            assert time.monotonic() - started < 5.0
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout:
            holder.stdout.close()
