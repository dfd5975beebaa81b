"""Several models started by manage_pod.py (issue 18), as processes in a temp dir: two mock vLLM servers from
``command`` entries, supervised, handed to the proxy in PROXY_BACKENDS, acted on one at a time, and shut down
leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmpod.backends import backends_from_env
from llmpod.pod import processes
from llmpod.pod.supervisor import MODEL_OF
from tests.support.e2e_harness import pid_alive, port_free
from tests.support.helpers import wait_until
from tests.support.models_harness import ROOT, Models, models_dir
from tests.support.servers import free_port


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Models]:
    with models_dir(tmp_path) as work:
        yield work


def test_two_models_started_supervised_and_shut_down(models: Models) -> None:
    up = models.run()
    assert up.returncode == 0, up.stderr
    # both answer directly at their base_urls, each as its own model
    assert models.answers("chat", models.chat_port) and models.answers("auto", models.auto_port)
    assert models.state("chat").state == models.state("auto").state == "healthy"
    chat_pid = models.record("chat")["pid"]
    # a model process gets no secret it does not use
    assert processes.environ_value(chat_pid, "RUNPOD_API_KEY") is None
    assert processes.environ_value(chat_pid, MODEL_OF) == str(models.path)
    # the proxy was handed both, with their state files
    proxy_pid = int((models.path / ".llmpod" / "proxy.pid").read_text())
    backends = backends_from_env(processes.environ_value(proxy_pid, "PROXY_BACKENDS") or "")
    assert [(b.id, b.base_url) for b in backends] == [
        ("chat", f"http://127.0.0.1:{models.chat_port}/v1"),
        ("auto", f"http://127.0.0.1:{models.auto_port}/v1"),
    ]
    assert backends[0].state_file == str(models.path / ".llmpod" / "models" / models.state_name("chat"))

    # killed: restarted (restarting, then healthy, restarts=1)
    seen: set[str] = set()
    os.kill(chat_pid, signal.SIGKILL)

    def back() -> bool:
        state = models.state("chat")
        seen.add(state.state)
        return state.state == "healthy" and state.restarts == 1

    wait_until(back, "chat restarted", timeout=60)
    assert "restarting" in seen
    assert models.answers("chat", models.chat_port)
    restarted_pid = models.record("chat")["pid"]
    # started by the watchdog, it carries none of the helpers' marks (it would pass for a stray watchdog)
    assert processes.environ_value(restarted_pid, "LLMPOD_WATCHDOG_OF") is None
    assert processes.environ_value(restarted_pid, "RUNPOD_API_KEY") is None

    # the proxy killed: the watchdog starts it again, with the same models
    os.kill(proxy_pid, signal.SIGKILL)
    wait_until(lambda: (models.path / ".llmpod" / "proxy.pid").read_text().strip() != str(proxy_pid), "new proxy")
    proxy_pid = int((models.path / ".llmpod" / "proxy.pid").read_text())
    wait_until(lambda: models.answers("chat", models.proxy_port), "the proxy answers again", timeout=30)
    assert backends_from_env(processes.environ_value(proxy_pid, "PROXY_BACKENDS") or "") == backends

    # killed past max_restarts (2): down with the reason
    for _ in range(2):
        pid = models.record("chat")["pid"]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda p=pid: models.record("chat")["pid"] not in (p, None) or models.state("chat").state == "down",
            "chat acted on",
            timeout=60,
        )  # type: ignore[misc]
        wait_until(lambda: models.state("chat").state in ("healthy", "down"), "chat settled", timeout=60)
    down = models.state("chat")
    assert down.state == "down"
    assert "killed by SIGKILL" in (down.last_error or "") and "max_restarts reached" in (down.last_error or "")
    assert models.answers("auto", models.auto_port)  # the other kept serving
    status = models.run("--status")
    assert "chat: down" in status.stdout and "auto: healthy" in status.stdout, status.stdout

    # one at a time, while the other keeps serving
    restarted = models.run("--restart", "chat")
    assert restarted.returncode == 0, restarted.stderr
    assert models.state("chat").state == "healthy" and models.answers("chat", models.chat_port)
    stopped = models.run("--stop", "auto")
    assert stopped.returncode == 0, stopped.stderr
    assert models.state("auto").state == "stopped" and port_free(models.auto_port)
    assert models.answers("chat", models.chat_port)
    wait_until(lambda: models.state("auto").state == "stopped", "auto stays stopped", timeout=2)  # never restarted
    assert models.run("--start", "auto").returncode == 0
    assert models.state("auto").state == "healthy" and models.answers("auto", models.auto_port)
    report = json.loads(models.run("--status", "--json").stdout)
    assert [(m["id"], m["state"]) for m in report["models"]] == [("chat", "healthy"), ("auto", "healthy")]

    # shutdown: nothing left
    pids = [models.record(m)["pid"] for m in ("chat", "auto")] + [proxy_pid]
    watchdog_pid = int((models.path / ".llmpod" / "watchdog.pid").read_text())
    down_all = models.run("--shutdown")
    assert down_all.returncode == 0, down_all.stderr
    assert not any(pid_alive(pid) for pid in [*pids, watchdog_pid])
    assert models.ours() == []
    assert all(port_free(port) for port in (models.proxy_port, models.chat_port, models.auto_port))
    assert not (models.path / "pod_state.json").exists()
    assert models.state("chat").state == models.state("auto").state == "stopped"


def test_a_crash_at_start_is_one_line_with_its_last_output(models: Models) -> None:
    models.write(args=["-m", "llmpod.mock", "--model", "chat", "--port", "not-a-port"])
    up = models.run()
    assert up.returncode != 0
    (line,) = up.stderr.strip().splitlines()
    assert line.startswith("manage_pod.py: llmModels.chat did not start: exited")
    assert "port" in line
    assert models.ours() == [] and not (models.path / "pod_state.json").exists()
    assert port_free(models.auto_port) and port_free(models.proxy_port)


def test_a_port_in_use_starts_nothing(models: Models) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", models.auto_port))
        taken.listen()
        up = models.run()
    assert up.returncode == 2
    assert f"llmModels.auto: port {models.auto_port}" in up.stderr
    assert models.ours() == [] and not (models.path / "pod_state.json").exists()


def test_what_a_wrapper_started_is_stopped_with_it(models: Models) -> None:
    """A command that starts the server behind a shell (which does not pass SIGTERM on): --stop, a restart and
    --shutdown still leave no server holding the port."""
    server = f"{sys.executable} -m llmpod.mock --model chat --port {models.chat_port}"
    models.write(command="sh", args=["-c", f"{server} & wait"])
    up = models.run()
    assert up.returncode == 0, up.stderr
    assert models.answers("chat", models.chat_port)
    stopped = models.run("--stop", "chat")
    assert stopped.returncode == 0, stopped.stderr
    assert port_free(models.chat_port)
    assert [p for p in models.ours() if processes.environ_value(p, "LLMPOD_MODEL_ID") == "chat"] == []
    assert models.run("--start", "chat").returncode == 0
    shell = models.record("chat")["pid"]
    os.kill(shell, signal.SIGKILL)  # the wrapper dies, its server lives on with the port: the restart clears it
    wait_until(lambda: models.record("chat")["pid"] not in (shell, None), "chat restarted", timeout=60)
    wait_until(lambda: models.state("chat").state == "healthy", "chat healthy again", timeout=60)
    assert models.answers("chat", models.chat_port)
    assert models.run("--shutdown").returncode == 0
    assert models.ours() == [] and port_free(models.chat_port)


def test_an_edited_config_is_taken_up_by_the_next_run(models: Models) -> None:
    """A model taken out of the config is stopped by the next run, one added is started, and the proxy is given
    the new set; the model that stayed keeps its process."""
    assert models.run().returncode == 0
    chat_pid, auto_pid = models.record("chat")["pid"], models.record("auto")["pid"]
    third = free_port()
    config = json.loads((models.path / "pod_config.json").read_text())
    del config["llmModels"]["auto"]
    config["llmModels"]["third"] = models.entry("third", third)
    (models.path / "pod_config.json").write_text(json.dumps(config))
    again = models.run()
    assert again.returncode == 0, again.stderr
    assert models.record("chat")["pid"] == chat_pid and not pid_alive(auto_pid) and port_free(models.auto_port)
    assert models.answers("third", third) and models.state("third").state == "healthy"
    proxy_pid = int((models.path / ".llmpod" / "proxy.pid").read_text())
    backends = backends_from_env(processes.environ_value(proxy_pid, "PROXY_BACKENDS") or "")
    assert [b.id for b in backends] == ["chat", "third"]
    # the watchdog supervises the new one too
    os.kill(models.record("third")["pid"], signal.SIGKILL)
    wait_until(lambda: models.state("third").restarts == 1 and models.state("third").state == "healthy", "third back")
    assert models.run("--shutdown").returncode == 0
    assert models.ours() == [] and port_free(third)


def test_a_server_never_ready_is_one_line_and_nothing_is_left(models: Models) -> None:
    models.write(command="sh", args=["-c", "echo loading weights; sleep 60"], start_timeout_seconds=1)
    del models.env["RUNPOD_API_KEY"]  # only local entries: no RunPod key is asked for
    up = models.run()
    assert up.returncode == 1
    assert up.stderr.strip() == "manage_pod.py: llmModels.chat did not start: not ready within 1s: loading weights"
    assert models.ours() == [] and not (models.path / "pod_state.json").exists()
    assert models.state("chat").state == "down"


def test_interrupted_while_starting_leaves_nothing(models: Models) -> None:
    models.write(command="sh", args=["-c", "sleep 60"], start_timeout_seconds=120)
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "manage_pod.py")],
        cwd=models.path,
        env=models.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: (models.path / "pod_state.json").exists() and len(models.ours()) >= 2, "both spawned")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert models.ours() == [] and not (models.path / "pod_state.json").exists()
    assert port_free(models.auto_port)
