"""Security: no secret (RunPod key, vLLM key, HF token, proxy key) anywhere a user or another local user could
read it, private files 0600, /debug/cache confined to the cache directory, and PROXY_API_KEY guarding every
route but /health, with a public bind refused without it. Counts go to the fault ledger ("security").
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.faults.hostile import ROOT, answer_problem, read_all, secret_sightings
from tests.faults.ledger import FaultLedger
from tests.support.e2e_harness import API_KEY, MODEL, FakeRunPod, Workdir
from tests.support.helpers import SERVED_MODEL, ProxyFactory, wait_for_stored, wait_until

AREA = "security"
# obviously fake, but shaped like the real thing so that any redaction by pattern would apply to them too
HF_TOKEN = "hf_FAKEtokenForTests0123456789abcdefXYZ"
PROXY_KEY = "llmpod-proxy-key-for-tests-0123456789"


def _cmdline(pid: int | None) -> bytes:
    if pid is None:
        return b""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _private(path: Path) -> bool:
    return not stat.S_IMODE(path.stat().st_mode) & 0o077


@pytest.mark.slow
def test_a_whole_session_leaves_no_secret_outside_the_state_file(
    workdir: Workdir, fake_runpod: FakeRunPod, fault_ledger: FaultLedger
) -> None:
    workdir.env.update(HF_TOKEN=HF_TOKEN, PROXY_API_KEY=PROXY_KEY)
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    base = f"http://127.0.0.1:{workdir.proxy_port}"
    artefacts: dict[str, bytes] = {}
    notes: list[str] = []
    dirty = 0

    def keep(label: str, result: subprocess.CompletedProcess[str]) -> None:
        artefacts[f"{label} stdout"] = result.stdout.encode()
        artefacts[f"{label} stderr"] = result.stderr.encode()

    up = workdir.run()
    keep("up", up)
    assert up.returncode == 0, up.stderr
    vllm_key = workdir.state()["vllm_api_key"]
    for name in ("proxy", "watchdog"):
        artefacts[f"{name} command line"] = _cmdline(workdir.pid(name))
    with httpx.Client(base_url=base, timeout=30) as http:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "def hello"}], "max_tokens": 16}
        answered = http.post("/v1/chat/completions", json=chat, headers=auth)
        assert answered.status_code == 200, answered.text
        wait_until(lambda: http.get("/metrics", headers=auth).json()["cache_entries"] >= 1, "the answer stored")
        responses = {
            "answer": answered,
            "hit": http.post("/v1/chat/completions", json=chat, headers=auth),
            "no key": http.post("/v1/chat/completions", json=chat),
            "wrong key": http.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"}),
            "unknown model": http.post("/v1/chat/completions", json={**chat, "model": "no-such"}, headers=auth),
            "bad body": http.post("/v1/chat/completions", content=b"{", headers=auth),
            "models": http.get("/v1/models", headers=auth),
            "health": http.get("/health"),
            "metrics": http.get("/metrics", headers=auth),
            "prometheus": http.get("/metrics", params={"format": "prometheus"}, headers=auth),
            "debug listing": http.get("/debug/cache", headers=auth),
            "openapi": http.get("/openapi.json", headers=auth),
        }
        key = answered.headers["x-cache-key"]
        responses["debug entry"] = http.get(f"/debug/cache/{key}", headers=auth)
        for label, response in responses.items():
            artefacts[f"{label} answer"] = (
                b"\n".join(f"{k}: {v}".encode() for k, v in response.headers.items()) + response.content
            )
            problem = answer_problem(response.status_code, response.headers.get("content-type", ""), response.content)
            if problem:
                dirty += 1
                notes.append(f"{label}: {problem}")
    status = workdir.run("--status", "--json")
    keep("status", status)
    state_private = _private(workdir.state_file)
    run_files = sorted((workdir.path / ".llmpod").iterdir())
    artefacts.update(read_all(run_files))
    artefacts.update(read_all((workdir.path / "cache").glob("*")))
    held = {str(workdir.state_file): workdir.state_file.read_bytes()}
    down = workdir.run("--shutdown")
    keep("shutdown", down)
    assert down.returncode == 0, down.stderr
    artefacts.update(read_all((workdir.path / ".llmpod").iterdir()))  # last_session.json, the logs' last lines
    artefacts.update(read_all([workdir.path / "pod_config.json"]))

    secrets = {"RunPod key": API_KEY, "vLLM key": vllm_key, "HF token": HF_TOKEN, "proxy key": PROXY_KEY}
    exposed = secret_sightings(artefacts, secrets)
    # pod_state.json must hold the vLLM key (the proxy is restarted with it) and nothing else secret
    exposed += secret_sightings(held, {k: v for k, v in secrets.items() if k != "vLLM key"})
    if not state_private:
        exposed.append("pod_state.json is readable by others")
    holders = [p for p in run_files if p.suffix in (".log", ".json") and p.name != "catalog.json"]
    loose = [p.name for p in holders if p.is_file() and not _private(p)]
    if loose or not _private(workdir.path / ".llmpod"):
        exposed.append(f"readable by others in .llmpod: {loose or ['the directory itself']}")
    fault_ledger.record(
        AREA,
        "secrets in logs, files, answers and command lines of a whole session",
        injected=len(secrets) * len(artefacts),
        secrets_exposed=len(exposed),
        dirty_errors=dirty,
        notes=[*exposed, *notes, f"{len(artefacts)} artefacts searched for {len(secrets)} secrets"],
    )


# ------------------------------------------------------------------------------------------ /debug/cache paths
CANARY = "CANARY-outside-the-cache-7f3a"
TRAVERSALS = [
    "..",
    "../canary.json",
    "..%2Fcanary.json",
    "%2e%2e%2fcanary.json",
    "%2e%2e/%2e%2e/canary.json",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "//etc/passwd",
    "..\\canary.json",
    "%00",
    "canary.json%00",
    "a" * 64 + "%2F..%2F..%2Fcanary",
    "A" * 64,
    "a" * 63,
    "a" * 65,
    "a" * 64 + ".json",
    "%252e%252e%252fcanary.json",
]


def test_debug_cache_never_reads_or_deletes_outside_the_cache(
    start_proxy: ProxyFactory, tmp_path: Path, fault_ledger: FaultLedger
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    outside = tmp_path / "canary.json"
    planted = "b" * 64
    # a canary that would pass for a cache entry if the proxy followed a link to it
    outside.write_bytes(
        orjson.dumps(
            {
                "format": 1,
                "key": planted,
                "canary": CANARY,
                "response": {"x": CANARY},
                "chunks": [],
                "completion_tokens": 0,
            }
        )
    )
    (cache_dir / f"{planted}.json").symlink_to(outside)
    (cache_dir / f"{'c' * 64}.json").symlink_to(tmp_path)  # a link to a directory, too
    proxy = start_proxy(cache_dir=cache_dir)
    notes: list[str] = []
    echoed = dirty = sent = 0
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        real = http.post(
            "/v1/chat/completions",
            json={"model": SERVED_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert real.status_code == 200
        wait_for_stored(http, 1)
        requests = [
            (method, f"/debug/cache/{key}") for key in [*TRAVERSALS, planted, "c" * 64] for method in ("GET", "DELETE")
        ]
        requests += [
            ("GET", "/debug/cache"),
            ("GET", "/debug/cache?limit=500"),
            ("GET", "/debug/cache/"),
            ("GET", f"/debug/cache?offset={2**70}&limit=-{2**70}"),
            ("DELETE", "/debug/cache"),
        ]
        for method, path in requests:
            sent += 1
            response = http.request(method, path)
            if CANARY.encode() in response.content or b"root:" in response.content:
                echoed += 1
                notes.append(f"{method} {path}: answered with a file outside the cache")
            problem = answer_problem(response.status_code, response.headers.get("content-type", ""), response.content)
            if problem:
                dirty += 1
                notes.append(f"{method} {path}: {problem}")
        if not outside.exists() or CANARY not in outside.read_text():
            dirty += 1
            notes.append("the canary outside the cache directory was deleted or changed")
        if not tmp_path.is_dir():
            dirty += 1
            notes.append("the directory a planted link pointed to is gone")
        served = http.post(
            "/v1/chat/completions",
            json={"model": SERVED_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        )
        if served.status_code != 200:
            dirty += 1
            notes.append(f"the proxy no longer answers: {served.status_code}")
    fault_ledger.record(
        AREA,
        "path traversal and planted symlinks on /debug/cache/{key}",
        injected=sent,
        secrets_exposed=echoed,
        dirty_errors=dirty,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------ PROXY_API_KEY
def test_the_proxy_key_guards_every_route_but_health(start_proxy: ProxyFactory, fault_ledger: FaultLedger) -> None:
    proxy = start_proxy(proxy_api_key=PROXY_KEY)
    routes = {(method, path) for route in _routes(proxy) for method, path in route}
    routes.discard(("GET", "/health"))
    routes |= {
        ("GET", "/nowhere"),
        ("GET", "/health/"),
        ("GET", "/HEALTH"),
        ("GET", "//health"),
        ("GET", "/health/../metrics"),
    }
    wrong = [
        {},
        {"Authorization": f"Bearer {PROXY_KEY[:-1]}"},
        {"Authorization": f"Basic {PROXY_KEY}"},
        {"Authorization": PROXY_KEY},
        {"api-key": "wrong", "x-api-key": ""},
        {"Authorization": f"Bearer {PROXY_KEY.upper()}"},
    ]
    notes: list[str] = []
    let_in = leaked = dirty = sent = 0
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        for method, path in sorted(routes):
            for headers in wrong:
                sent += 1
                response = http.request(method, path, headers=headers, json={"model": SERVED_MODEL})
                if PROXY_KEY.encode() in response.content:
                    leaked += 1
                    notes.append(f"{method} {path}: the answer shows the key")
                if response.status_code != 401:
                    let_in += 1
                    notes.append(f"{method} {path} with {sorted(headers) or 'no key'}: {response.status_code}")
                elif answer_problem(401, response.headers.get("content-type", ""), response.content):
                    dirty += 1
                    notes.append(f"{method} {path}: 401 is not OpenAI-shaped")
        sent += 3
        if http.get("/health").status_code != 200:
            dirty += 1
            notes.append("/health needs the key")
        for headers in ({"Authorization": f"Bearer {PROXY_KEY}"}, {"api-key": PROXY_KEY}):
            if http.get("/v1/models", headers=headers).status_code != 200:
                dirty += 1
                notes.append(f"the right key in {sorted(headers)} is refused")
    fault_ledger.record(
        AREA,
        "requests without the right PROXY_API_KEY",
        injected=sent,
        dirty_errors=let_in + dirty,
        secrets_exposed=leaked,
        notes=notes,
    )


def _routes(proxy: Any) -> list[list[tuple[str, str]]]:
    """Every (method, concrete path) the app serves, from its own route table (docs and schema included)."""
    from llmpod.proxy.app import create_app
    from llmpod.proxy.settings import ProxySettings

    app = create_app(ProxySettings())
    found = []
    for route in app.routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        concrete = path.replace("{key}", "a" * 64)
        found.append(
            [(method, concrete) for method in sorted(getattr(route, "methods", None) or {"GET"}) if method != "HEAD"]
        )
    return found


# tests/proxy/test_cli.py refuses PROXY_HOST=0.0.0.0 in the default run already
PUBLIC_HOSTS = [pytest.param(host, marks=pytest.mark.soak) for host in ("::", "0.0.0.0", "192.168.1.50")]


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
def test_a_public_bind_without_a_proxy_key_is_refused(tmp_path: Path, fault_ledger: FaultLedger, host: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROXY_API_KEY"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "proxy_fastapi.py"), "--host", host, "--port", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stderr.strip().splitlines()
    refused = result.returncode == 2 and len(lines) == 1 and "PROXY_API_KEY" in lines[0]
    fault_ledger.record(
        AREA,
        "public bind address without PROXY_API_KEY",
        injected=1,
        dirty_errors=0 if refused and "Traceback" not in result.stderr else 1,
        notes=[f"--host {host}: exit {result.returncode}: {result.stderr.strip()[-200:]}"],
    )
