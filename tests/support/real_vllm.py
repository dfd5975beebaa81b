"""Start vLLM's REAL OpenAI-compatible server (CPU, stubbed engine core) for a test or a recording.

The server is the shared tool ``shared/tools/real-vllm/serve_stub.py`` (see its README): vLLM's own argument parser,
``build_app``, routers, middleware, error handlers, chat-template rendering, tokenizer and tool parsers, with only the
GPU engine replaced by a deterministic stub. It runs under the python named by ``LLMPOD_VLLM_PYTHON`` (a virtualenv
with ``vllm`` installed, e.g. ``/tmp/vllm-venv/bin/python``); nothing here is part of the default test run.

Where the tool is found: ``$LLMPOD_REAL_VLLM_STUB`` if set, else ``shared/tools/real-vllm/serve_stub.py`` beside the
repository (``<repo>/../shared/...``), which holds from any worktree or clone placed next to ``shared/``.

What the harness changes in ``args`` (``vllm serve`` arguments, e.g. the ones ``manage_pod.py`` builds for a pod):
- ``--model X`` (or the positional ``vllm serve X``) where X is not a local folder is replaced by the stub's
  ``tiny-llama/`` folder: a pod's real Hugging Face repo cannot be downloaded here (no network, no GPU). When no
  ``--served-model-name`` is given, X becomes it, so clients still address the model by the name the pod would serve.
- ``--host`` and ``--port`` are replaced by 127.0.0.1 and a free port (a pod binds 0.0.0.0:8000).
Everything else (``--max-model-len``, ``--api-key``, ``--enable-auto-tool-choice``, ``--tool-call-parser``,
``--chat-template``, the stub's own ``--stub-*`` flags) goes to the server unchanged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from llmpod._net import free_port
from llmpod.tool_calling import flag_value

PYTHON_ENV = "LLMPOD_VLLM_PYTHON"
STUB_ENV = "LLMPOD_REAL_VLLM_STUB"
STARTUP_TIMEOUT = 60.0  # about 13 s on two idle cores (importing torch and vllm); slack for a busy machine
STOP_TIMEOUT = 15.0


def stub_script() -> Path:
    """Where serve_stub.py is: $LLMPOD_REAL_VLLM_STUB, else ../shared/tools/real-vllm/ from the repository root."""
    override = os.environ.get(STUB_ENV)
    if override:
        return Path(override)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "tools" / "real-vllm" / "serve_stub.py"


def vllm_available() -> str | None:
    """None when real vLLM can be started here, else the reason it cannot (for pytest.skip or an error line)."""
    python = os.environ.get(PYTHON_ENV)
    if not python:
        return f"{PYTHON_ENV} is not set (a python with vllm installed, e.g. /tmp/vllm-venv/bin/python)"
    if not os.access(python, os.X_OK):
        return f"{PYTHON_ENV}={python} is not an executable"
    script = stub_script()
    if not script.is_file():
        return f"the real-vLLM tool is not at {script} (set {STUB_ENV})"
    try:
        probe = _version_probe(python)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} cannot be run: {exc}"
    if probe.returncode != 0:
        return f"vllm is not installed for {python}"
    return None


def _version_probe(python: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def vllm_version() -> str:
    """The version of vllm installed for $LLMPOD_VLLM_PYTHON (call vllm_available() first)."""
    probe = _version_probe(os.environ[PYTHON_ENV])
    probe.check_returncode()
    return probe.stdout.strip()


def _without(args: list[str], flag: str) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def server_argv(args: list[str], port: int, script: Path) -> list[str]:
    """The serve_stub.py arguments for ``vllm serve`` ``args``: local model, loopback host, the given port."""
    args = list(args)
    if args and args[0] == "serve":  # tolerate a copied `vllm serve ...` tail
        args = args[1:]
    model: str | None = None
    if args and not args[0].startswith("-"):  # positional `vllm serve MODEL`
        model = args.pop(0)
    named = flag_value(args, "--model")  # the last one, as vLLM's argparse takes it
    if named is not None:
        model = named
        args = _without(args, "--model")
    tiny = str(script.parent / "tiny-llama")
    if model is None or not Path(model).is_dir():
        if model is not None and flag_value(args, "--served-model-name") is None:
            args += ["--served-model-name", model]
        model = tiny
    args = _without(_without(args, "--host"), "--port")
    return ["--model", model, *args, "--host", "127.0.0.1", "--port", str(port)]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _exit_status(pid: int) -> int | None:
    """Our child ``pid``'s return code once it has exited (negative: the signal that killed it), None while it runs,
    WITHOUT reaping it: while it is an unreaped zombie its pid, and so its process group id, cannot be reused, so
    signalling the group can only reach what we started. (Popen.poll() would reap it.)"""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited (reaped or not), without reaping it."""
    try:
        return _exit_status(pid) is not None
    except ChildProcessError:
        return True


def _reaped(pid: int) -> bool:
    try:
        _exit_status(pid)
    except ChildProcessError:
        return True
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's own process group (it runs in a new session we created), SIGKILL after STOP_TIMEOUT,
    then SIGKILL whatever of the group outlived the leader (a tokenizer worker, say), and only then reap. A leader
    already reaped gets no signal at all: its group id may be another process's by now."""
    if _reaped(proc.pid):
        proc.wait()
        return
    for sig, patience in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        if _exited(proc.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + patience
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is still our unreaped child here: the group is ours
    proc.wait()


@contextlib.contextmanager
def real_vllm(args: list[str], *, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run vLLM's real OpenAI server with ``vllm serve`` ``args``; yield its base URL ``http://127.0.0.1:PORT``.

    ``env`` adds to (overrides) the inherited environment. Raises RuntimeError when vLLM is unavailable, exits, or
    is not healthy within STARTUP_TIMEOUT (the message carries the tail of its log). The process is stopped and
    reaped on exit, its log file removed."""
    reason = vllm_available()
    if reason is not None:
        raise RuntimeError(f"real vLLM unavailable: {reason}")
    script = stub_script()
    port = free_port()
    argv = [os.environ[PYTHON_ENV], str(script), *server_argv(args, port, script)]
    child_env = {**os.environ, **(env or {})}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not _healthy(url):
                status = _exit_status(proc.pid)  # not proc.poll(): _stop must signal the group before reaping
                if status is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace").strip().splitlines()[-15:]
                    state = f"exited with {status}" if status is not None else "is not healthy"
                    raise RuntimeError(f"real vLLM {state} ({' '.join(argv[1:])}):\n" + "\n".join(tail))
                time.sleep(0.25)
            yield url
        finally:
            _stop(proc)


if __name__ == "__main__":  # smoke: python3 -m tests.support.real_vllm
    import sys

    why = vllm_available()
    if why:
        sys.exit(f"unavailable: {why}")
    with real_vllm(["--model", "some/repo", "--served-model-name", "smoke", "--host", "0.0.0.0"]) as base:
        print(base, urllib.request.urlopen(base + "/version", timeout=5).read().decode())
