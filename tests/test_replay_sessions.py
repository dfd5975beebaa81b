"""The session replay (bench/replay_sessions.py) end to end on the recorded sessions: a rerun a day and a minute
later hits with the cache-key rules and not without them, and no near-duplicate shares a key; a rule that takes
out too much is caught as false merges and fails the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import replay_sessions

SESSIONS = Path(__file__).resolve().parents[1] / "bench" / "sessions"


@pytest.mark.slow
def test_the_recorded_sessions_hit_on_a_rerun_with_no_false_merge(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    assert replay_sessions.main(["--sessions", str(SESSIONS), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    clients = {entry["session"]: entry for entry in figures["clients"]}
    assert {"kilo", "continue", "aider"} <= set(clients)
    for entry in clients.values():
        assert entry["hits_with"] == entry["requests"] > 0  # every request of the rerun is a hit
        assert entry["near_duplicates"] >= 4 and entry["false_merges"] == 0
    # without the rules, only Kilo's title request (no time in it) hits
    assert [clients[name]["hits_without"] for name in ("kilo", "continue", "aider")] == [1, 0, 0]
    assert figures["false_merges"] == 0 and figures["errors"] == []


@pytest.mark.slow
def test_a_rule_that_takes_out_what_the_user_typed_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    too_broad = [{"name": "any-time", "pattern": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "roles": ["user"]}]
    code = replay_sessions.main(["--sessions", str(SESSIONS / "kilo.json"), "--extra-rules", json.dumps(too_broad)])
    assert code == 1
    captured = capsys.readouterr()
    merges = int(captured.out.rsplit("false merges: ", 1)[1].split()[0])
    assert merges == len(json.loads((SESSIONS / "kilo.json").read_text())["requests"])  # one per request
    assert "a typed time 0" in captured.err and "a typed time 1" in captured.err


def test_placeholders_are_written_as_each_client_writes_them() -> None:
    when = replay_sessions.SECOND_RUN
    rendered = replay_sessions.render(["@@MESSAGE_TIME_2@@", "@@DATE_STRING@@", "@@DATE_ISO@@"], when)
    assert rendered == ["2026-12-04T18:46:32Z", "Fri Dec 04 2026", "2026-12-04"]
    with pytest.raises(ValueError, match="unknown placeholder"):
        replay_sessions.render("@@NOW@@", when)
