#!/usr/bin/env python3
"""Replay recorded coding-agent sessions through the proxy: what does its cache give each client on a rerun?

    python3 bench/replay_sessions.py [--sessions bench/sessions] [--json PATH] [--extra-rules JSON]

Each session (``bench/sessions/*.json``) is what one client really sent for one task, request after request
(an agent's turns grow the conversation), with the parts the client makes up each time written as placeholders:
``@@MESSAGE_TIME_<n>@@`` (the time of user turn n, ISO 8601 to the second, as Kilo writes it),
``@@DATE_STRING@@`` (JavaScript's ``toDateString``, as in Kilo's system prompt) and ``@@DATE_ISO@@``
(``YYYY-MM-DD``, as in Continue's and aider's). The sessions are played twice through a real proxy process in
front of the mock vLLM server, the second time a day and a minute later (new times, a new day: what a rerun of the
task tomorrow sends), once with the cache-key rules switched off and once with them on (each with an empty cache).
The figure per client is the hit rate of the second run.

Then near-duplicates of every request are sent, requests that differ in substance: another task, another working
directory, a time typed by the user in the question (two of them, a minute apart), one tool less, another
temperature. Any two requests of different substance that got one key are a false merge; there must be none.

Prints a Markdown table (client, hit rate without and with normalisation, false merges); exit code 1 if any
false merge (or a request failed), 2 for bad arguments. Every server it starts is stopped, its temp directory
removed; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.servers import ServerProcess, base_env  # noqa: E402

SESSIONS = ROOT / "bench" / "sessions"
FIRST_RUN = datetime.datetime(2026, 12, 3, 18, 45, 12, tzinfo=datetime.timezone.utc)
SECOND_RUN = FIRST_RUN + datetime.timedelta(days=1, minutes=1)
TURN_GAP = datetime.timedelta(seconds=20)  # between two user turns of one session
OTHER_TASK = "write bye.py that prints bye"
TYPED_TIMES = ("2026-12-03T18:45:12Z", "2026-12-03T18:46:12Z")  # Kilo's own format, typed outside its block
PLACEHOLDER = re.compile(r"@@([A-Z_]+?)(?:_(\d+))?@@")
REQUEST_TIMEOUT = 60.0
STORE_TIMEOUT = 30.0


@dataclass
class Session:
    name: str
    client: str
    task: str
    cwd: str
    user_agent: str
    requests: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Session:
        data = json.loads(path.read_text())
        return cls(path.stem, data["client"], data["task"], data["cwd"], data.get("user_agent", ""), data["requests"])


@dataclass
class Outcome:
    """What one proxy answered: per client, the second run's hits; per key, the substances that got it."""

    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tried: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # near-duplicates sent
    keys: dict[str, set[tuple[str, int, str]]] = field(default_factory=lambda: defaultdict(set))
    errors: list[str] = field(default_factory=list)

    def false_merges(self, session: str | None = None) -> int:
        """Requests of another substance that shared a key with one before them."""
        return sum(
            len(substances) - 1
            for substances in self.keys.values()
            if session is None or any(s[0] == session for s in substances)
        )


def render(value: Any, when: datetime.datetime) -> Any:
    """``value`` with every placeholder replaced as the client would write it at ``when``."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: _placeholder(m, when), value)
    if isinstance(value, list):
        return [render(item, when) for item in value]
    if isinstance(value, dict):
        return {key: render(item, when) for key, item in value.items()}
    return value


def _placeholder(match: re.Match[str], when: datetime.datetime) -> str:
    name, number = match.group(1), match.group(2)
    if name == "MESSAGE_TIME" and number is not None:
        return (when + TURN_GAP * (int(number) - 1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if name == "DATE_STRING":
        return when.strftime("%a %b %d %Y")  # toDateString: "Thu Dec 03 2026"
    if name == "DATE_ISO":
        return when.strftime("%Y-%m-%d")
    raise ValueError(f"unknown placeholder {match.group(0)}")


def replace_text(value: Any, old: str, new: str) -> Any:
    """``value`` with ``old`` replaced by ``new`` in every string it holds."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [replace_text(item, old, new) for item in value]
    if isinstance(value, dict):
        return {key: replace_text(item, old, new) for key, item in value.items()}
    return value


def near_duplicates(session: Session, body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Requests that differ from ``body`` in substance, as (what differs, request); none equal to ``body``."""
    made: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
        ("another task", lambda b: replace_text(b, session.task, OTHER_TASK)),
        ("another working directory", lambda b: replace_text(b, session.cwd, session.cwd + "-other")),
        *(
            (f"a typed time {i}", lambda b, t=t: replace_text(b, session.task, f"{session.task} (due {t})"))
            for i, t in enumerate(TYPED_TIMES)
        ),
        ("one tool less", lambda b: {**b, "tools": b["tools"][:-1]} if b.get("tools") else b),
        ("another temperature", lambda b: {**b, "temperature": (b.get("temperature") or 0) + 0.5}),
    ]
    for what, change in made:
        other = change(body)
        if other != body:
            yield what, other


def play(proxy: ServerProcess, sessions: list[Session]) -> Outcome:
    """Both runs and the near-duplicates through ``proxy``; it starts with an empty cache."""
    outcome = Outcome()
    with httpx.Client(base_url=proxy.url, timeout=REQUEST_TIMEOUT) as http:

        def send(session: Session, index: int, substance: str, body: dict[str, Any]) -> str:
            headers = {"User-Agent": session.user_agent} if session.user_agent else {}
            response = http.post("/v1/chat/completions", json=body, headers=headers)
            response.read()
            key = response.headers.get("x-cache-key", "")
            if response.status_code != 200 or not key:
                outcome.errors.append(
                    f"{session.name} #{index} ({substance}): {response.status_code} {response.text[:200]}"
                )
                return "ERROR"
            outcome.keys[key].add((session.name, index, substance))
            return response.headers.get("x-cache", "")

        for session in sessions:
            for index, body in enumerate(session.requests):
                send(session, index, "as recorded", render(body, FIRST_RUN))
        _wait_stored(http, len(outcome.keys))
        for session in sessions:
            for index, body in enumerate(session.requests):
                outcome.requests[session.name] += 1
                if send(session, index, "as recorded", render(body, SECOND_RUN)) == "HIT":
                    outcome.hits[session.name] += 1
        for session in sessions:
            for index, body in enumerate(session.requests):
                for what, other in near_duplicates(session, render(body, SECOND_RUN)):
                    outcome.tried[session.name] += 1
                    send(session, index, what, other)
    return outcome


def _wait_stored(http: httpx.Client, entries: int) -> None:
    """Answers are written just after they are sent: the second run must find the first one's."""
    deadline = time.monotonic() + STORE_TIMEOUT
    while http.get("/metrics").json().get("cache_entries", 0) < entries:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not store {entries} answers within {STORE_TIMEOUT:.0f} s")
        time.sleep(0.05)


def proxy_process(name: str, work: Path, upstream: ServerProcess, rules_off: str, extra_rules: str) -> ServerProcess:
    env = base_env(
        {
            "RUNPOD_ENDPOINT": f"{upstream.url}/v1",
            "CACHE_DIR": str(work / f"cache-{name}"),
            "LOG_FILE": str(work / f"{name}.requests.log"),
            "CACHE_KEY_RULES_OFF": rules_off,
            "CACHE_KEY_RULES": extra_rules,
        }
    )
    argv = [sys.executable, str(ROOT / "proxy_fastapi.py"), "--port", "{port}"]
    return ServerProcess(name, argv, env, work / f"{name}.log")


def replay(sessions: list[Session], extra_rules: str = "") -> dict[str, Outcome]:
    """The outcome with the rules off and on, each through its own proxy and cache."""
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="llmpod-replay-") as temp:
        work = Path(temp)
        models = {str(body.get("model")) for session in sessions for body in session.requests}
        if len(models) != 1:
            raise ValueError(f"the sessions must ask for one model, not {sorted(models)}")
        # the model the clients asked for, calling tools as a pod of it does, with room for Kilo's 13k-token prompt
        argv = [sys.executable, str(ROOT / "mock_vllm_server.py"), "--port", "{port}", "--model", models.pop()]
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--max-model-len", "131072"]
        mock = ServerProcess("mock", argv, base_env({}), work / "mock.log")
        started: list[ServerProcess] = []
        try:
            mock.start()
            started.append(mock)
            for mode, off in (("off", "all"), ("on", "")):
                proxy = proxy_process(f"proxy-rules-{mode}", work, mock, off, extra_rules)
                proxy.start()
                started.append(proxy)
                outcomes[mode] = play(proxy, sessions)
                proxy.stop()
        finally:
            for server in reversed(started):
                server.stop()
    return outcomes


def report(sessions: list[Session], outcomes: dict[str, Outcome]) -> tuple[str, dict[str, Any]]:
    """The Markdown table and the same figures as JSON."""
    off, on = outcomes["off"], outcomes["on"]
    lines = [
        "| client | requests per run | hit rate of the rerun, without normalisation | with normalisation "
        "| false merges (near-duplicates tried) |",
        "|---|---|---|---|---|",
    ]
    figures: dict[str, Any] = {"first_run": FIRST_RUN.isoformat(), "second_run": SECOND_RUN.isoformat(), "clients": []}
    for session in sessions:
        name, count = session.name, on.requests[session.name]
        merges = off.false_merges(name) + on.false_merges(name)
        lines.append(
            f"| {session.client} | {count} | {_rate(off.hits[name], count)} | {_rate(on.hits[name], count)} "
            f"| {merges} ({on.tried[name]}) |"
        )
        figures["clients"].append(
            {
                "session": name,
                "client": session.client,
                "requests": count,
                "hits_without": off.hits[name],
                "hits_with": on.hits[name],
                "false_merges": merges,
                "near_duplicates": on.tried[name],
            }
        )
    figures["false_merges"] = off.false_merges() + on.false_merges()
    figures["merged"] = [
        sorted(f"{name} #{index} ({what})" for name, index, what in substances)
        for outcome in (off, on)
        for substances in outcome.keys.values()
        if len(substances) > 1
    ]
    figures["errors"] = off.errors + on.errors
    return "\n".join(lines), figures


def _rate(hits: int, count: int) -> str:
    return f"{hits}/{count} ({100 * hits / count:.0f} %)" if count else "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--sessions", type=Path, nargs="+", default=[SESSIONS], help="session files or folders")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--extra-rules", default="", help="CACHE_KEY_RULES for the proxy (a JSON list of rules)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [p for path in args.sessions for p in (sorted(path.glob("*.json")) if path.is_dir() else [path])]
    if not paths:
        print("no session files", file=sys.stderr)
        return 2
    sessions = [Session.load(path) for path in paths]
    table, figures = report(sessions, replay(sessions, args.extra_rules))
    print(table)
    for error in figures["errors"]:
        print(f"request failed: {error}", file=sys.stderr)
    for merged in figures["merged"]:
        print(f"false merge, one key for: {'; '.join(merged)}", file=sys.stderr)
    print(f"false merges: {figures['false_merges']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["false_merges"] or figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
