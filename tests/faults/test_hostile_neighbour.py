"""Hostile neighbours: a web page the user visits, another local user, a client that keeps the pod billing
(issue 16). Each attack is tried on the product as the user runs it (the proxy and the mock as processes,
``manage_pod.py`` against the fake RunPod) and counted in the fault ledger ("hostile neighbour"); an attack
that got what it was after counts under "attacks that worked".

"Another local user" needs root to fake: a file ``chown``-ed to uid 65534 (nobody) stands for one, as in
tests/proxy/test_cache_neighbours.py; without root those attacks are skipped (CI containers run as root).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.servers import ServerProcess
from llmpod._net import free_port
from tests.faults.hostile import answer_problem, proxy_process, raw_request
from tests.faults.ledger import FaultLedger
from tests.faults.proxy_runner import mock_process, running
from tests.support.e2e_harness import API_KEY, FakeRunPod, Workdir
from tests.support.helpers import SERVED_MODEL, wait_until

AREA = "hostile neighbour"
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file another user's")
CANARY = "PRIVATE-prompt-of-the-user-7f3a"  # what a page must never read back
FOREIGN_HOSTS = ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "0x7f000001"]
FOREIGN_ORIGINS = ["http://evil.example", "https://evil.example:443", "null", "file://", "chrome-extension://abc"]
FORM_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]


@pytest.fixture
def mock(tmp_path: Path) -> Iterator[ServerProcess]:
    with running(mock_process(tmp_path, "mock")) as server:
        yield server


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": SERVED_MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": content}], **extra}


def generations(mock: ServerProcess) -> int:
    requests = httpx.get(f"{mock.url}/mock/stats", timeout=5).json()["requests"]
    return int(requests.get("chat.completions", 0)) + int(requests.get("completions", 0))


def entries(http: httpx.Client) -> int:
    return int(http.get("/metrics").json()["cache_entries"])


# ------------------------------------------------------------------------------------------ a web page
def test_a_web_page_cannot_read_clear_or_drive_the_proxy(
    tmp_path: Path, mock: ServerProcess, fault_ledger: FaultLedger
) -> None:
    notes: list[str] = []
    worked = dirty = sent = 0
    with (
        running(proxy_process(tmp_path, f"{mock.url}/v1")) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30) as http,
    ):
        assert http.post("/v1/chat/completions", json=chat(CANARY)).status_code == 200
        wait_until(lambda: entries(http) >= 1, "the user's answer stored")
        key = http.get("/debug/cache").json()["entries"][0]["key"]
        before = generations(mock)

        def attack(label: str, method: str, path: str, headers: dict[str, str], **kwargs: object) -> None:
            nonlocal worked, dirty, sent
            sent += 1
            response = http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
            if response.is_success or CANARY.encode() in response.content:
                worked += 1
                notes.append(f"{label}: {method} {path} answered {response.status_code}")
            problem = answer_problem(response.status_code, response.headers.get("content-type", ""), response.content)
            if problem:
                dirty += 1
                notes.append(f"{label}: {method} {path}: {problem}")
            if "access-control-allow-origin" in response.headers:
                worked += 1
                notes.append(f"{label}: {method} {path} grants CORS")

        routes = [
            ("GET", "/debug/cache"),
            ("GET", f"/debug/cache/{key}"),
            ("DELETE", f"/debug/cache/{key}"),
            ("DELETE", "/debug/cache"),
            ("GET", "/metrics"),
            ("GET", "/v1/models"),
            ("GET", "/health"),
        ]
        for host in FOREIGN_HOSTS:  # DNS rebinding: the page's own name, now pointing at 127.0.0.1
            for method, path in routes:
                attack("rebound Host", method, path, {"Host": host})
            for path in ("/v1/chat/completions", "/v1/completions"):
                attack("rebound Host", "POST", path, {"Host": host}, json=chat("rebinding"))
        for origin in FOREIGN_ORIGINS:  # a page calling 127.0.0.1 directly
            for method, path in routes:
                attack("foreign Origin", method, path, {"Origin": origin})
            attack("foreign Origin", "POST", "/v1/chat/completions", {"Origin": origin}, json=chat("origin"))
        for content_type in FORM_TYPES:  # CSRF: a form posts a "simple" request, no preflight
            body = f'{{"model": "{SERVED_MODEL}", "messages": [{{"role": "user", "content": "csrf"}}]}}'
            headers = {"Content-Type": content_type} if content_type else {}
            attack("form POST", "POST", "/v1/chat/completions", headers, content=body)
            attack("form POST", "POST", "/v1/completions", headers, content=body)

        sent += 1
        if generations(mock) != before or entries(http) != 1:
            worked += 1
            notes.append(f"a page generated: {generations(mock) - before} upstream calls, {entries(http)} entries")
        listing = http.get("/debug/cache")
        if listing.status_code != 200 or key not in listing.text:
            worked += 1
            notes.append("the user's cached answer is gone")
    fault_ledger.record(AREA, "a web page: DNS rebinding, foreign Origin, form POSTs (CSRF)", injected=sent,
                        attacks_worked=worked, dirty_errors=dirty, notes=notes)  # fmt: skip


# ------------------------------------------------------------------------------------------ another local user
@as_root
def test_another_local_user_cannot_plant_answers_or_read_them(
    tmp_path: Path, mock: ServerProcess, fault_ledger: FaultLedger
) -> None:
    notes: list[str] = []
    worked = dirty = sent = 0
    cache = tmp_path / "proxy_cache"

    # the cache directory made first by someone else, or left open to everyone: refused with one line
    for label, make in (("owned by another user", lambda p: os.chown(p, NOBODY, NOBODY)),
                        ("writable by everyone", lambda p: os.chmod(p, 0o777))):  # fmt: skip
        planted = tmp_path / f"planted-{len(label)}"
        planted.mkdir(mode=0o700)
        make(planted)
        sent += 1
        outcome = _proxy_start(tmp_path, mock, CACHE_DIR=str(planted))
        if outcome.returncode != 2 or len(outcome.stderr.strip().splitlines()) != 1:
            worked += 1
            notes.append(f"cache dir {label}: exit {outcome.returncode}, {outcome.stderr.strip()[-160:]!r}")

    # an answer of ours, then the neighbour's work on the directory while the proxy is down
    with running(proxy_process(tmp_path, f"{mock.url}/v1")) as proxy, httpx.Client(base_url=proxy.url) as http:
        real = http.post("/v1/chat/completions", json=chat("what is two plus two")).json()
        wait_until(lambda: entries(http) >= 1, "the answer stored")
        assert http.post("/v1/chat/completions", json=chat("fifo")).status_code == 200
        wait_until(lambda: entries(http) >= 2, "the second answer stored")
        listing = http.get("/debug/cache").json()["entries"]
    sent += 1
    if not stat_private(cache) or any(not stat_private(p) for p in cache.glob("*.json")):
        worked += 1
        notes.append("the cache directory or an entry is readable by others")
    first, second = (cache / f"{e['key']}.json" for e in sorted(listing, key=lambda e: e["key"] != _key_of(listing)))
    document = first.read_bytes().replace(real["choices"][0]["message"]["content"].encode(), b"PLANTED-answer")
    first.write_bytes(document)
    os.chown(first, NOBODY, NOBODY)  # an entry that is someone else's: never served
    second.unlink()
    os.mkfifo(second, 0o600)  # a FIFO where an entry was: must not freeze the proxy
    foreign_temp = cache / ".tmp-neighbour"
    foreign_temp.write_text("theirs")
    os.chown(foreign_temp, NOBODY, NOBODY)
    bashrc = tmp_path / "bashrc"
    bashrc.write_text("# the user's shell\n")
    log_link = tmp_path / "linked.log"
    log_link.symlink_to(bashrc)

    sent += 1  # a symlinked LOG_FILE pointing at the user's .bashrc: refused, nothing appended
    outcome = _proxy_start(tmp_path, mock, LOG_FILE=str(log_link))
    if outcome.returncode != 2 or bashrc.read_text() != "# the user's shell\n":
        worked += 1
        notes.append(f"LOG_FILE symlink: exit {outcome.returncode}, .bashrc now {bashrc.read_text()!r}")

    with (
        running(proxy_process(tmp_path, f"{mock.url}/v1")) as proxy,
        httpx.Client(base_url=proxy.url, timeout=15) as http,
    ):
        sent += 3
        answer = http.post("/v1/chat/completions", json=chat("what is two plus two"))
        if b"PLANTED" in answer.content or answer.headers.get("x-cache") == "HIT":
            worked += 1
            notes.append("another user's entry was served")
        try:
            fifo = http.post("/v1/chat/completions", json=chat("fifo"))
            if fifo.status_code != 200:
                dirty += 1
                notes.append(f"FIFO entry: {fifo.status_code}")
        except httpx.TimeoutException:
            worked += 1
            notes.append("a FIFO planted as an entry froze the proxy")
        if not foreign_temp.exists() or not first.exists():
            worked += 1
            notes.append("start-up deleted another user's files")
        sent += 1  # a model name with a newline and shell characters: logged escaped
        http.post("/v1/chat/completions", json={**chat("x"), "model": "m\n$(rm -rf ~)`id`;\x1b[2J"})
    log = (tmp_path / "proxy_requests.log").read_text()
    if "\n$(" in log or "`id`" in log or "\x1b" in log:
        worked += 1
        notes.append("a raw model name reached the request log")
    fault_ledger.record(AREA, "another local user: planted cache dir, entries, FIFO, temp files, log symlink",
                        injected=sent, attacks_worked=worked, dirty_errors=dirty, notes=notes)  # fmt: skip


def stat_private(path: Path) -> bool:
    return not os.stat(path).st_mode & 0o077


def _key_of(listing: list[dict[str, object]]) -> object:
    """The key of the first question's entry (the one whose preview asks about two plus two)."""
    for entry in listing:
        if "two plus two" in str(entry):
            return entry["key"]
    return listing[0]["key"]


def _proxy_start(tmp_path: Path, mock: ServerProcess, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the proxy as a user would; a refused setting ends it at once with one line. One still running
    after 15 s took the setting (the attack worked): it is stopped, and its exit code is None."""
    server = proxy_process(tmp_path, f"{mock.url}/v1", **env)
    argv = [sys.executable, *server._argv[1:-1], str(free_port())]
    with subprocess.Popen(argv, env=server._env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            out, err = child.communicate(timeout=15)
            code: int | None = child.returncode
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            code = None
    return subprocess.CompletedProcess(argv, code, out, err)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the bill
def test_a_neighbour_cannot_keep_the_pod_billing_through_the_proxy(tmp_path: Path, fault_ledger: FaultLedger) -> None:
    notes: list[str] = []
    worked = dirty = sent = 0
    # answers of megabytes of SSE, so that a client that stops reading fills the socket buffers
    long_answers = mock_process(tmp_path, "mock", "--chunk-count", "80000", "--max-model-len", "1000000")
    with (
        running(long_answers) as mock,
        running(proxy_process(tmp_path, f"{mock.url}/v1", PROXY_SEND_TIMEOUT="1")) as proxy,
        httpx.Client(base_url=proxy.url, timeout=15) as http,
    ):
        assert http.post("/v1/chat/completions", json=chat("real work", max_tokens=4)).status_code == 200
        idle_since = http.get("/metrics").json()["last_request_at"]
        for body in (b"{", b"[]", b'{"model": 3}', b'{"messages": []}', b"\xff", b'{"model": "nope", "messages": []}'):
            sent += 1  # a page or a script POSTing garbage to keep the idle clock at zero
            response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            if answer_problem(response.status_code, response.headers.get("content-type", ""), response.content):
                dirty += 1
                notes.append(f"{body!r}: {response.status_code}")
        if http.get("/metrics").json()["last_request_at"] != idle_since:
            worked += 1
            notes.append("failing requests moved the idle clock")

        sent += 1  # a client that asks for a long stream and stops reading: cut, no longer in flight
        mock_body = chat("stall", stream=True, max_tokens=80_000)
        payload = httpx.Request("POST", f"{proxy.url}/v1/chat/completions", json=mock_body)
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            stalled.connect(("127.0.0.1", proxy.port))
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            content = payload.read()
            stalled.sendall(f"{head}Content-Length: {len(content)}\r\n\r\n".encode() + content)
            try:
                wait_until(lambda: http.get("/metrics").json()["in_flight"] == 0, "the stalled reader cut", 30, 0.2)
            except AssertionError:
                worked += 1
                notes.append("a client that stopped reading stays in flight")

        sent += 1  # HTTP/1.0 does not know chunked: it gets a length, not a framing it cannot read
        streamed = json.dumps(chat("an old client", stream=True, max_tokens=8)).encode()
        outcome = raw_request(
            proxy.port,
            b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(streamed)}\r\n\r\n".encode()
            + streamed,
        )
        if outcome.status != 200 or b"chunked" in outcome.head.lower():
            dirty += 1
            notes.append(f"HTTP/1.0: {outcome.head[:120]!r}")
    fault_ledger.record(AREA, "the bill: failing requests, a stalled reader, an HTTP/1.0 client", injected=sent,
                        attacks_worked=worked, dirty_errors=dirty, notes=notes)  # fmt: skip


# soak: the full fault run counts it; the default run has the same behaviour in tests/pod (test_session, test_processes)
@pytest.mark.soak
def test_shutdown_signals_and_terminates_only_what_is_ours(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger
) -> None:
    notes: list[str] = []
    worked = sent = 0
    auth = {"Authorization": f"Bearer {API_KEY}"}
    up = workdir.run()
    assert up.returncode == 0, up.stderr
    ours = workdir.state()["pod_id"]
    foreign = httpx.post(  # a pod of the same account that this directory never made
        f"{fake_runpod.url}/v2/pods",
        headers=auth,
        json={"name": "someone-elses", "image": "ubuntu:24.04", "gpu": {"id": "NVIDIA L40S"}},
        timeout=30,
    ).json()["id"]

    def live() -> set[str]:
        return {pod["id"] for pod in fake_runpod.live_pods()}

    state = workdir.state()
    workdir.state_file.write_text(json.dumps({**state, "pod_id": foreign}))  # hand-edited, or another's
    sent += 1
    refused = workdir.run("--shutdown")
    if foreign not in live() or refused.returncode != 2:
        worked += 1
        notes.append(f"a state file naming another pod: exit {refused.returncode}, that pod live: {foreign in live()}")
    workdir.state_file.write_text(json.dumps(state))
    done = workdir.run("--shutdown")
    assert done.returncode == 0, done.stderr

    sleeper = subprocess.Popen(  # someone else's process whose command line says --watchdog
        [sys.executable, "-c", "import time; time.sleep(120)", "--watchdog", "llmpod.proxy"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for name in ("watchdog", "proxy"):  # stale pid files whose pid was reused by it
            (workdir.path / ".llmpod" / f"{name}.pid").write_text(str(sleeper.pid))
        sent += 1
        again = workdir.run("--shutdown")
        if sleeper.poll() is not None or again.returncode != 0:
            worked += 1
            notes.append(f"--shutdown signalled a process that only looked like ours: exit {again.returncode}")
    finally:
        sleeper.kill()
        sleeper.wait()
        httpx.delete(f"{fake_runpod.url}/v2/pods/{foreign}", headers=auth, timeout=30)
    fault_ledger.record(AREA, "a stale pid file and a state file naming someone else's pod", injected=sent,
                        attacks_worked=worked, pods_left_running=int(ours in live()), notes=notes)  # fmt: skip


# ------------------------------------------------------------------------------------------ answers of another kind
# soak: the full fault run counts it; the default run has the same behaviour in tests/pod/test_manage_pod_e2e.py
@pytest.mark.soak
def test_answers_of_the_mock_are_never_served_for_a_real_pod(workdir: Workdir, fault_ledger: FaultLedger) -> None:
    """Not an attacker, but the same harm: after trying --local, the first real questions were answered from the
    mock's cache (the same model id). Each mock answer served for the pod counts as corrupt."""
    notes: list[str] = []
    questions = [f"def task_{n}():" for n in range(3)]
    assert workdir.run("--local").returncode == 0
    for question in questions:
        assert workdir.chat(question).status_code == 200
    assert workdir.run("--shutdown").returncode == 0
    up = workdir.run()  # RunPod (the fake): the same directory, cache and model id
    assert up.returncode == 0, up.stderr
    served = 0
    for question in questions:
        answer = workdir.chat(question)
        if answer.headers.get("x-cache") != "MISS":
            served += 1
            notes.append(f"{question!r}: {answer.headers.get('x-cache')} from the mock's cache")
    again = workdir.chat(questions[0])  # the pod's own answers are cached as usual
    lost = int(again.headers.get("x-cache") != "HIT")
    if lost:
        notes.append(f"the pod's own answer was not cached: {again.headers.get('x-cache')}")
    assert workdir.run("--shutdown").returncode == 0
    fault_ledger.record(AREA, "answers the --local mock cached, asked again of a RunPod pod", injected=len(questions),
                        corrupt_served=served, lost_answers=lost, notes=notes)  # fmt: skip
