"""Bad input: the proxy's HTTP API fuzzed from its own OpenAPI schema and with hand-written hostile bodies and
lying headers, and manage_pod.py fed broken pod_config.json and pod_state.json files.

The proxy must answer every one with a 4xx in the OpenAI shape (or, for framing it cannot parse, close the
connection), never a 5xx other than an honest 502/504, never a traceback or a hang, and stay up with bounded
memory. manage_pod.py must stop with one line and exit 2, create nothing, and never lose sight of a running
pod whose state file was damaged. Counts go to the fault ledger ("bad input").
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.hostile import RawOutcome, answer_problem, proxy_process, raw_request, rss_mib
from tests.faults.ledger import FaultLedger
from tests.support.helpers import SERVED_MODEL
from tests.support.servers import LoopbackServer

AREA = "bad input"
MIB = 1024 * 1024
MAX_BODY = 8 * MIB  # the proxy subprocess's MAX_BODY_BYTES: the memory bound is stated in these
RSS_GROWTH_BOUND = 24 * MAX_BODY / MIB  # MiB over the warmed-up RSS: a few copies of the largest body, no more
ROUND_GROWTH_BOUND = 48.0  # MiB a repeat of the same batch may add (allocator slack; a leak adds per round)
REQUEST_BOUND = 60.0  # seconds one hostile request may take before it counts as a hang (a shared, slow machine)


# ------------------------------------------------------------------------------------------ hostile bodies
def _chat(**overrides: Any) -> dict[str, Any]:
    return {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **overrides}


def _raw_chat(fragment: str) -> bytes:
    """A chat body with ``fragment`` (raw JSON text, possibly nested deeper than Python's json writes) inside."""
    template = json.dumps(_chat(messages=[{"role": "user", "content": "x", "extra": "@"}]))
    return template.replace('"@"', fragment).encode()


def hostile_bodies(huge: int) -> dict[str, bytes]:
    """Request bodies no client should send, by name; ``huge`` is the size of the oversized strings."""
    dumps = lambda value: json.dumps(value).encode()  # noqa: E731
    return {
        "invalid UTF-8": b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe\xc0"}]}',
        "lone surrogate escape": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "NUL bytes": dumps(_chat(model="a\u0000b", messages=[{"role": "user", "content": "\u0000" * 64}])),
        "NaN": b'{"temperature": NaN, "messages": []}',
        "1e400": b'{"temperature": 1e400, "messages": []}',
        "integer beyond 64 bits": dumps(_chat(max_tokens=2**70, seed=-(2**80))),
        "arrays nested 100k deep": b"[" * 100_000,
        "objects nested 100k deep": b'{"a":' * 100_000,
        "nested 300 deep (orjson reads, cannot write)": _raw_chat("[" * 300 + "]" * 300),
        "nested 1000 deep in a message": _raw_chat("[" * 1000 + "]" * 1000),
        "empty": b"",
        "null": b"null",
        "array": dumps([_chat()]),
        "number": b"42",
        "model is a number": dumps(_chat(model=123)),
        "model is an object": dumps(_chat(model={"id": SERVED_MODEL})),
        "messages is a string": dumps(_chat(messages="hi")),
        "role and content are numbers": dumps(_chat(messages=[{"role": 1, "content": 2}])),
        "content part text is a number": dumps(
            _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
        ),
        "content is an object": dumps(_chat(messages=[{"role": "user", "content": {"a": 1}}])),
        "max_tokens is a string": dumps(_chat(max_tokens="lots")),
        "max_tokens is negative": dumps(_chat(max_tokens=-5)),
        "max_tokens is a float": dumps(_chat(max_tokens=3.5)),
        "stream is a string": dumps(_chat(stream="yes")),
        "stream_options is a number": dumps(_chat(stream=True, stream_options=5)),
        "cache field is a string": dumps(_chat(cache="no")),
        "temperature is a string": dumps(_chat(temperature="hot")),
        "tools are junk": dumps(_chat(tools=[{"type": "function", "function": 5}], tool_choice={"a": [1]})),
        "prompt nested lists": dumps({"model": SERVED_MODEL, "prompt": [[1], [2]], "max_tokens": 4}),
        "prompt is a number": dumps({"model": SERVED_MODEL, "prompt": 5}),
        "model name with a newline": dumps(_chat(model="x\nFORGED status=200 cache=HIT")),
        "10k stop strings": dumps(_chat(stop=["x"] * 10_000)),
        "100k messages": dumps(_chat(messages=[{"role": "user", "content": "x"}] * 100_000, max_tokens=None)),
        "huge message": dumps(_chat(messages=[{"role": "user", "content": "x " * (huge // 2)}], max_tokens=None)),
        "huge model name": dumps(_chat(model="m" * huge)),
        "over the body limit": dumps(_chat(messages=[{"role": "user", "content": "y" * (MAX_BODY + MIB)}])),
    }


QUICK_BODIES = (
    "invalid UTF-8",
    "NaN",
    "arrays nested 100k deep",
    "nested 300 deep (orjson reads, cannot write)",
    "model is a number",
    "messages is a string",
    "content part text is a number",
    "stream is a string",
    "model name with a newline",
    "integer beyond 64 bits",
    "100k messages",
    "huge model name",
    "over the body limit",
)


# ------------------------------------------------------------------------------------------ lying framing
def _request(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n" + body


BODY = json.dumps(_chat()).encode()
PATH = "POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
LYING_HEADERS: dict[str, tuple[bytes, bool]] = {  # name -> (bytes sent, then half-close our side)
    "Content-Length shorter than the body": (_request(f"{PATH}Content-Length: 10\n", BODY), False),
    "Content-Length longer, then close": (_request(f"{PATH}Content-Length: {len(BODY) + 500}\n", BODY), True),
    "Content-Length not a number": (_request(f"{PATH}Content-Length: abc\n", BODY), False),
    "Content-Length negative": (_request(f"{PATH}Content-Length: -1\n", BODY), False),
    "Content-Length of 10^20": (_request(f"{PATH}Content-Length: 100000000000000000000\n", BODY), True),
    "two different Content-Lengths": (_request(f"{PATH}Content-Length: 5\nContent-Length: {len(BODY)}\n", BODY), False),
    "Content-Length and chunked": (
        _request(
            f"{PATH}Content-Length: {len(BODY)}\nTransfer-Encoding: chunked\n",
            f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n",
        ),
        False,
    ),
    "chunk size not hex": (_request(f"{PATH}Transfer-Encoding: chunked\n", b"zz\r\n" + BODY + b"\r\n0\r\n\r\n"), False),
    "chunked, cut before the last chunk": (
        _request(f"{PATH}Transfer-Encoding: chunked\n", f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n"),
        True,
    ),
    "no Content-Length, body then close": (_request(PATH, BODY), True),
    "header line without a colon": (_request(f"{PATH}Content-Length: {len(BODY)}\nnot a header\n", BODY), False),
    "100 KiB header": (_request(f"{PATH}X-Junk: {'j' * 100_000}\nContent-Length: {len(BODY)}\n", BODY), False),
}


# ------------------------------------------------------------------------------------------ the proxy under test
@pytest.fixture
def proxy_subprocess(mock_vllm: LoopbackServer, tmp_path: Path) -> Iterator[Any]:
    server = proxy_process(tmp_path, f"{mock_vllm.url}/v1", MAX_BODY_BYTES=str(MAX_BODY))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _send_bodies(base: str, bodies: dict[str, bytes], notes: list[str]) -> int:
    """POST every body to both generation routes; the number of dirty answers (each noted)."""
    dirty = 0
    with httpx.Client(base_url=base, timeout=REQUEST_BOUND) as http:
        for route in ("/v1/chat/completions", "/v1/completions"):
            for name, body in bodies.items():
                try:
                    response = http.post(route, content=body, headers={"Content-Type": "application/json"})
                    problem = answer_problem(
                        response.status_code, response.headers.get("content-type", ""), response.content
                    )
                except httpx.TimeoutException:
                    problem = f"no answer within {REQUEST_BOUND:.0f}s"
                except httpx.HTTPError as exc:
                    problem = f"connection failed: {type(exc).__name__}"
                if problem:
                    dirty += 1
                    notes.append(f"{route} {name}: {problem}")
    return dirty


def _after_checks(server: Any, log_paths: list[Path], notes: list[str]) -> int:
    """The proxy still runs and answers /health, and wrote no traceback; the number of failures."""
    failures = 0
    if not server.alive():
        notes.append("the proxy process died")
        return 1
    try:
        if httpx.get(f"{server.url}/health", timeout=REQUEST_BOUND).status_code != 200:
            failures += 1
            notes.append("/health is not 200 afterwards")
    except httpx.HTTPError as exc:
        failures += 1
        notes.append(f"/health failed afterwards: {type(exc).__name__}")
    for path in log_paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        if "Traceback" in text:
            failures += 1
            notes.append(f"traceback in {path.name}: {text[text.index('Traceback') :][:300]!r}")
        forged = [line for line in text.splitlines() if line.startswith("FORGED")]
        if forged:
            failures += 1
            notes.append(f"a client forged {len(forged)} line(s) in {path.name}")
    return failures


@pytest.mark.parametrize("rounds", [pytest.param(1, id="quick"), pytest.param(3, id="soak", marks=pytest.mark.soak)])
def test_hostile_bodies_and_lying_headers_get_clean_4xx_with_bounded_memory(
    proxy_subprocess: Any, tmp_path: Path, fault_ledger: FaultLedger, rounds: int
) -> None:
    server = proxy_subprocess
    logs = [server.log_path, tmp_path / "proxy_requests.log"]
    every = hostile_bodies(huge=MAX_BODY - MIB)
    bodies = {name: every[name] for name in QUICK_BODIES} if rounds == 1 else every
    notes: list[str] = []
    _send_bodies(server.url, {"warm-up": json.dumps(_chat()).encode()}, notes)  # imports, first upstream call
    before = rss_mib(server.pid)
    after_round = []
    dirty = 0
    started = time.monotonic()
    for _ in range(rounds):
        dirty += _send_bodies(server.url, bodies, notes)
        if not server.alive():
            break
        after_round.append(rss_mib(server.pid))
    elapsed = time.monotonic() - started
    dirty += _after_checks(server, logs, notes)
    growth = max(after_round, default=before) - before
    if growth > RSS_GROWTH_BOUND:
        dirty += 1
        notes.append(f"RSS grew {growth:.0f} MiB over {before:.0f} MiB (bound {RSS_GROWTH_BOUND:.0f})")
    if len(after_round) > 1 and after_round[-1] - after_round[0] > ROUND_GROWTH_BOUND:
        dirty += 1
        notes.append(f"RSS keeps growing with each round: {', '.join(f'{r:.0f}' for r in after_round)} MiB")
    fault_ledger.record(
        AREA,
        "hostile request bodies (bad UTF-8, deep nesting, huge strings, wrong types, 100k messages)",
        injected=2 * len(bodies) * rounds,
        dirty_errors=dirty,
        notes=[
            *notes,
            f"RSS MiB: {before:.0f} warmed up, after each round {[round(r) for r in after_round]}; {elapsed:.1f}s",
        ],
    )

    # the same proxy, on raw sockets: framing that lies must get a 4xx or a clean close, never a 5xx or a hang
    notes, dirty = [], 0
    outcomes: dict[str, RawOutcome] = {}
    for _ in range(rounds):
        for name, (payload, half_close) in LYING_HEADERS.items():
            outcome = outcomes[name] = raw_request(server.port, payload, half_close=half_close, bound=15.0)
            problem = outcome.problem()
            if problem:
                dirty += 1
                notes.append(f"{name}: {problem}")
    dirty += _after_checks(server, logs, notes)
    fault_ledger.record(
        AREA,
        "request framing that lies (Content-Length, chunked, header junk)",
        injected=len(LYING_HEADERS) * rounds,
        dirty_errors=dirty,
        notes=[
            *notes,
            "; ".join(f"{name}: {o.status or ('closed' if o.closed else '?')}" for name, o in outcomes.items()),
        ],
    )


# ------------------------------------------------------------------------------------------ schemathesis
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")


def _fuzz_from_schema(base: str, examples: int, reproducible: bool) -> tuple[int, int, list[str], dict[str, int]]:
    """Every operation of the schema the proxy publishes, ``examples`` positive and negative cases each, sent
    over loopback HTTP. Returns (cases sent, dirty answers, notes, answers by status)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    published = httpx.get(f"{base}/openapi.json", timeout=REQUEST_BOUND).json()
    schema = schemathesis.openapi.from_dict(published)
    counts = {"sent": 0, "dirty": 0}
    statuses: dict[str, int] = {}
    notes: list[str] = []
    config = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=reproducible,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    def served_model(pair: tuple[Any, bool]) -> Any:
        # half the generated bodies name the served model, so fuzzed fields get past the model check to vLLM;
        # those ask for few answers: the mock generates n of them on its event loop, and a fuzzed n of 10**9
        # would test the mock's patience (the proxy answers an honest 504), not the proxy
        case, name_it = pair
        if isinstance(case.body, dict):  # (a body without a model gets the only served one)
            if name_it:
                case.body["model"] = SERVED_MODEL
            for field in ("n", "best_of"):
                if isinstance(case.body.get(field), int | float) and case.body[field] > 2:
                    case.body[field] = 2
            if isinstance(case.body.get("prompt"), list):
                case.body["prompt"] = case.body["prompt"][:2]
        return case

    def sender(http: httpx.Client, label: str, strategy: Any) -> Any:
        @given(case=strategy)
        @config
        def send(case: Any) -> None:
            counts["sent"] += 1
            request = case.as_transport_kwargs(base_url=base)
            content = json.dumps(request["json"]).encode() if "json" in request else request.get("data")
            try:
                response = http.request(
                    request["method"],
                    request["url"],
                    headers=request["headers"],
                    params=request.get("params"),
                    content=content,
                )
            except httpx.HTTPError as exc:
                problem: str | None = f"no answer: {type(exc).__name__}"
            else:
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                problem = answer_problem(
                    response.status_code, response.headers.get("content-type", ""), response.content
                )
            if problem:
                counts["dirty"] += 1
                notes.append(f"{label}: {problem}; sent {str(content)[:120]}")

        return send

    with httpx.Client(timeout=REQUEST_BOUND) as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)
                if mode is schemathesis.GenerationMode.NEGATIVE and operation.path.endswith("{key}"):
                    continue  # any string is a valid key to ask for: positive cases already send junk keys
                if operation.path in GENERATION_ROUTES:
                    strategy = st.tuples(strategy, st.booleans()).map(served_model)
                with contextlib.suppress(Unsatisfiable):  # no negative case for an operation without inputs
                    sender(http, f"{operation.label} ({mode.value})", strategy)()
    return counts["sent"], counts["dirty"], notes, statuses


@pytest.mark.parametrize("examples", [pytest.param(3, id="quick"), pytest.param(50, id="soak", marks=pytest.mark.soak)])
def test_schemathesis_fuzz_of_the_published_schema(start_proxy: Any, fault_ledger: FaultLedger, examples: int) -> None:
    proxy = start_proxy(max_body_bytes=MAX_BODY)
    started = time.monotonic()
    sent, dirty, notes, statuses = _fuzz_from_schema(proxy.url, examples, reproducible=examples < 100)
    elapsed = time.monotonic() - started
    health = httpx.get(f"{proxy.url}/health", timeout=REQUEST_BOUND)
    if health.status_code != 200 or health.json()["status"] != "healthy":
        dirty += 1
        notes.append(f"/health afterwards: {health.status_code} {health.text[:120]}")
    fault_ledger.record(
        AREA,
        "schemathesis cases from the proxy's OpenAPI schema (positive and negative)",
        injected=sent,
        dirty_errors=dirty,
        notes=[*notes, f"answers by status {dict(sorted(statuses.items()))}; {elapsed:.1f}s"],
    )


# ------------------------------------------------------------------------------------------ manage_pod.py's files
def _damaged(good: bytes) -> dict[str, bytes]:
    """What a crash, a disk or a person can leave of a JSON file ``good`` (one object, keys in order)."""
    document = json.loads(good)
    first = next(key for key, value in document.items() if isinstance(value, str))

    def edit(**changes: Any) -> bytes:
        return json.dumps({**document, **changes}).encode()

    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "cut after one byte": good[:1],
        "binary garbage": bytes(range(256)) * 8,
        "NUL bytes": b"\x00" * 512,
        "not UTF-8": good.replace(b'"', b'"\xff', 1),
        "nested 100k deep": b"[" * 100_000,
        "an array": b"[" + good + b"]",
        "null": b"null",
        "trailing comma": good.rstrip().rstrip(b"}").rstrip() + b",}",
        "a comment": b"// edited by hand\n" + good,
        "duplicate key": good.rstrip().rstrip(b"}") + f', "{first}": null}}'.encode(),
        "unknown key": edit(surprise=True),
        "number where a string belongs": edit(**{first: 12345}),
        "string where a number belongs": edit(
            **{k: "soon" for k, v in document.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        ),
        "every value null": json.dumps(dict.fromkeys(document)).encode(),
    }


QUICK_CONFIG_DAMAGE = ("truncated", "number where a string belongs")
QUICK_STATE_DAMAGE = ("nested 100k deep",)
QUICK_AND_SOAK = [pytest.param(False, id="quick"), pytest.param(True, id="soak", marks=pytest.mark.soak)]


def _record_a_running_pod(workdir: Any, fake: Any) -> None:
    """A pod created at the fake RunPod under our prefix, and a pod_state.json naming it."""
    from llmpod.pod.state import PodState, RuntimePaths, save_state
    from tests.support.e2e_harness import API_KEY, MODEL

    name = f"llmpod-{os.urandom(4).hex()}"
    body = {
        "name": name,
        "image": "vllm/vllm-openai:v0.33.0",
        "gpu": {"id": "NVIDIA L40S", "count": 1},
        "ports": ["8000/http"],
    }
    created = httpx.post(f"{fake.url}/v2/pods", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    created.raise_for_status()
    now = time.time()
    paths = RuntimePaths(workdir.path)
    paths.ensure()
    save_state(
        paths,
        PodState(
            provider="runpod",
            phase="ready",
            pod_name=name,
            pod_id=created.json()["id"],
            model_id=MODEL,
            served_model=MODEL,
            vllm_api_key=os.urandom(16).hex(),
            created_at=now,
            ready_at=now,
            expires_at=now + 3600,
            idle_timeout_seconds=0,
            proxy_port=workdir.proxy_port,
        ),
    )


def _clean_exit_2(result: Any, *, one_line: bool) -> str | None:
    if "Traceback" in result.stderr:
        return "traceback: " + result.stderr[result.stderr.index("Traceback") :][-200:]
    if result.returncode != 2:
        return f"exit {result.returncode}: {result.stderr.strip()[-200:]}"
    lines = result.stderr.strip().splitlines()
    if one_line and len(lines) != 1:
        return f"{len(lines)} lines on stderr: {result.stderr.strip()[:200]}"
    return None


@pytest.mark.slow
@pytest.mark.soak  # the default run has tests/pod/test_manage_pod_e2e.py's bad configs and pod/test_config.py's fuzz
@pytest.mark.parametrize("full", [True])
def test_a_bad_pod_config_exits_2_in_one_line_creating_nothing(
    workdir: Any, fake_runpod: Any, fault_ledger: FaultLedger, full: bool
) -> None:
    config = workdir.path / "pod_config.json"
    damage = _damaged(config.read_bytes())
    cases = damage if full else {name: damage[name] for name in QUICK_CONFIG_DAMAGE}
    notes: list[str] = []
    dirty = runs = 0
    for index, (name, content) in enumerate(cases.items()):
        config.write_bytes(content)
        # every damage on the plain run; the other commands on a few (each run is a whole process start)
        for command in [(), ("--status",), ("--shutdown",)] if full and index < 3 else [()]:
            runs += 1
            problem = _clean_exit_2(workdir.run(*command, timeout=60), one_line=True)
            if problem:
                dirty += 1
                notes.append(f"{name} ({' '.join(command) or 'up'}): {problem}")
    creates = fake_runpod.creates()
    if creates:
        notes.append(f"{creates} pod(s) created from a bad config")
    fault_ledger.record(
        AREA,
        "damaged pod_config.json (truncated, wrong types, unknown keys, garbage)",
        injected=runs,
        dirty_errors=dirty,
        pods_left_running=len(fake_runpod.live_pods()),
        unrecorded_pods=creates,
        notes=notes,
    )


@pytest.mark.slow
@pytest.mark.parametrize("full", QUICK_AND_SOAK)
def test_a_damaged_state_file_never_loses_the_running_pod(
    workdir: Any, fake_runpod: Any, fault_ledger: FaultLedger, full: bool
) -> None:
    if full:
        up = workdir.run()
        assert up.returncode == 0, up.stderr
    else:
        _record_a_running_pod(workdir, fake_runpod)  # what `manage_pod.py` leaves, minus its helpers: quicker
    good = workdir.state_file.read_bytes()
    pod = workdir.state()["pod_name"]
    damage = _damaged(good)
    cases = damage if full else {name: damage[name] for name in QUICK_STATE_DAMAGE}
    notes: list[str] = []
    dirty = unrecorded = runs = 0
    for index, (name, content) in enumerate(cases.items()):
        workdir.state_file.write_bytes(content)
        # both commands on a few damages, then one each in turn (each run is a whole process start)
        for command in (("--status",), ()) if index < 3 else [(("--status",), ())[index % 2]]:
            runs += 1
            result = workdir.run(*command, timeout=60)
            problem = _clean_exit_2(result, one_line=False)
            if problem:
                dirty += 1
                notes.append(f"{name} ({' '.join(command) or 'up'}): {problem}")
            if pod not in result.stderr or "--shutdown --all" not in result.stderr:
                unrecorded += 1
                notes.append(f"{name} ({' '.join(command) or 'up'}): the running pod {pod} is not listed")
        workdir.state_file.write_bytes(good)
    # and then the user cleans up as told: the pod goes, and so does the damaged file
    workdir.state_file.write_bytes(damage["truncated"])
    runs += 1
    down = workdir.run("--shutdown", "--all", timeout=120)
    if down.returncode != 0 or "Traceback" in down.stderr:
        dirty += 1
        notes.append(f"--shutdown --all: exit {down.returncode}: {down.stderr.strip()[-200:]}")
    if workdir.state_file.exists():
        dirty += 1
        notes.append("--shutdown --all left the damaged pod_state.json behind: every later run stops on it")
    again = workdir.run("--status", timeout=60)
    if again.returncode != 0:
        dirty += 1
        notes.append(f"--status after cleaning up: exit {again.returncode}: {again.stderr.strip()[-200:]}")
    left = [p for p in fake_runpod.live_pods() if p["name"] == pod]
    creates = fake_runpod.creates()
    fault_ledger.record(
        AREA,
        "damaged pod_state.json while the pod runs",
        injected=runs,
        dirty_errors=dirty,
        unrecorded_pods=unrecorded,
        pods_left_running=len(left) + max(0, creates - 1),
        notes=notes,
    )
