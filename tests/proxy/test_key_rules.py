"""Cache-key normalisation (issue 17): a coding agent's turn repeated a minute or a day later is a hit, while
the request forwarded is the client's byte for byte, and requests that differ in substance keep their own keys."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpod.errors import ConfigError
from llmpod.key_rule_spec import BUILTIN_RULES, KeyRule
from llmpod.pod import load_pod_config
from llmpod.pod.progress import Reporter
from llmpod.pod.sidecars import Sidecars
from llmpod.pod.state import PodState, RuntimePaths
from llmpod.proxy.app import create_app
from llmpod.proxy.key_rules import KeyNormaliser, required_text
from llmpod.proxy.keys import cache_key
from llmpod.proxy.settings import ProxySettings
from tests.support.helpers import SHORT_MODEL, MockControl, ProxyFactory, wait_for_stored
from tests.support.servers import LoopbackServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clients"
CHAT = "chat.completions"
KIND = "vllm"  # the server kind every key names (issue 16); these keys are a real pod's
# the recorded bodies carry placeholders for the time, the day and the project directory
RECORDED_TIME, RECORDED_DAY, RECORDED_CWD = "2000-01-01T00:00:00Z", "Sat Jan 01 2000", "/home/user/project"


def recorded(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["body"]  # type: ignore[no-any-return]


def kilo(
    time: str = "2026-12-03T18:45:12Z",
    day: str = "Thu Dec 03 2026",
    task: str = '"write hello.py that prints hello"',
    cwd: str = RECORDED_CWD,
    fixture: str = "kilo_turn",
) -> dict[str, Any]:
    """Kilo Code CLI 7.7.7's first turn as recorded, with its volatile parts (and the task, the cwd) set."""
    text = json.dumps(recorded(fixture))
    text = text.replace(RECORDED_TIME, time).replace(RECORDED_DAY, day).replace(RECORDED_CWD, cwd)
    body: dict[str, Any] = json.loads(text)
    body["messages"][1]["content"][0]["text"] = task
    body["model"] = SHORT_MODEL
    return body


def continue_turn(day: str) -> dict[str, Any]:
    body = json.loads(json.dumps(recorded("continue_turn")).replace("Today's date: 2000-01-01", f"Today's date: {day}"))
    body["model"] = SHORT_MODEL
    return body


def key_of(body: dict[str, Any], normaliser: KeyNormaliser | None = None) -> str:
    return cache_key(CHAT, (normaliser or KeyNormaliser(BUILTIN_RULES)).normalise(CHAT, body)[0], KIND)


# --------------------------------------------------------------------------------------------- the rules
def test_a_kilo_turn_a_minute_and_a_day_later_has_the_same_key_and_the_body_is_untouched() -> None:
    first, later = kilo(), kilo(time="2026-12-04T18:46:12.250Z", day="Fri Dec 04 2026")
    sent = copy.deepcopy(later)
    keyed, rules = KeyNormaliser(BUILTIN_RULES).normalise(CHAT, later)
    assert rules == ("kilo-message-time", "kilo-today")
    assert later == sent  # what is forwarded is what the client sent
    assert "2026-12-04T18:46:12.250Z" not in json.dumps(keyed) and "Fri Dec 04 2026" not in json.dumps(keyed)
    assert key_of(first) == key_of(later)


def test_continue_on_a_new_day_has_the_same_key() -> None:
    assert key_of(continue_turn("2026-12-03")) == key_of(continue_turn("2026-12-04"))
    assert KeyNormaliser(BUILTIN_RULES).normalise(CHAT, continue_turn("2026-12-04"))[1] == ("continue-today",)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(kilo(task='"write bye.py that prints bye"'), id="another task"),
        pytest.param(kilo(cwd="/home/user/other-project"), id="another working directory"),
        pytest.param(kilo(task='"what happened at 2026-12-03T18:45:12Z?"'), id="a time typed in the question"),
        pytest.param(kilo(task="Message time: 2026-12-03T18:45:12Z"), id="a Message time line typed by the user"),
        pytest.param(kilo(fixture="kilo_turn_after_tool"), id="a later turn"),
        pytest.param({**kilo(), "temperature": 0.7}, id="another temperature"),
        pytest.param({**kilo(), "tools": kilo()["tools"][:-1]}, id="other tools"),
        pytest.param({**kilo(), "tool_choice": "none"}, id="another tool choice"),
        pytest.param({**kilo(), "max_tokens": 100}, id="another max_tokens"),
    ],
)
def test_requests_that_differ_in_substance_keep_their_own_keys(other: dict[str, Any]) -> None:
    base = kilo()
    moved = json.loads(json.dumps(other).replace("2026-12-03T18:45:12Z\\n", "2026-12-03T18:46:12Z\\n"))
    assert key_of(moved) != key_of(base)


def test_user_typed_time_outside_the_block_is_kept_apart() -> None:
    # the same question with another time typed into it: the typed time is the question's, not Kilo's
    a = kilo(task="log the event of 2026-12-03T18:45:12Z", time="2026-12-03T18:45:12Z")
    b = kilo(task="log the event of 2026-12-03T18:46:12Z", time="2026-12-03T18:46:12Z")
    assert key_of(a) != key_of(b)


def test_requests_no_rule_touches_keep_the_keys_they_always_had() -> None:
    # computed by the code before issue 17 (190a648, with the server kind): the cache entries a user already has
    # keep matching
    pinned = "8cf7ff47eeee95f3e84fe9c3bd263f6d3f32c9db603e0a572aee4e2d6b8b2101"
    assert cache_key(CHAT, recorded("aider"), KIND) == pinned
    body = recorded("aider")
    keyed, rules = KeyNormaliser(BUILTIN_RULES).normalise(CHAT, body)
    assert keyed is body and rules == ()
    assert key_of(body) == cache_key(CHAT, body, KIND)


def test_a_normalised_key_never_equals_a_key_sent_that_way() -> None:
    marked = kilo(time="\u27e6kilo-message-time\u27e7", day="\u27e6kilo-today\u27e7")
    assert key_of(marked) != key_of(kilo())


def test_a_user_rule_applies_only_in_its_role_and_block() -> None:
    rule = KeyRule(name="build-id", pattern=r"^Build: \d+$", roles=["user"], block="meta")
    normaliser = KeyNormaliser((rule,))

    def body(build: int, where: str) -> dict[str, Any]:
        text = f"fix it\n<meta>\nBuild: {build}\n</meta>" if where == "block" else f"fix it\nBuild: {build}"
        return {"model": "m", "messages": [{"role": "user", "content": text}]}

    assert key_of(body(1, "block"), normaliser) == key_of(body(2, "block"), normaliser)
    assert key_of(body(1, "outside"), normaliser) != key_of(body(2, "outside"), normaliser)
    system = {"model": "m", "messages": [{"role": "system", "content": "<meta>\nBuild: 1\n</meta>"}]}
    assert normaliser.normalise(CHAT, system)[1] == ()


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"CACHE_KEY_RULES": '[{"name": "x", "pattern": ".*"}]'}, "matches the empty string"),
        ({"CACHE_KEY_RULES": '[{"name": "x", "pattern": "("}]'}, "not a regular expression"),
        ({"CACHE_KEY_RULES": '[{"name": "x", "pattern": "a", "roles": ["usr"]}]'}, "unknown role 'usr'"),
        ({"CACHE_KEY_RULES": '[{"name": "kilo-today", "pattern": "a"}]'}, "used twice"),
        ({"CACHE_KEY_RULES": "{"}, "CACHE_KEY_RULES is not JSON"),
        ({"CACHE_KEY_RULES_OFF": "kilo-todya"}, "'kilo-todya' is switched off but is no rule"),
    ],
)
def test_a_bad_rule_setting_is_one_line(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        ProxySettings.from_env(env)


# ------------------------------------------------------------------------------------- through the proxy
@pytest.fixture
def mock_vllm_settings() -> dict[str, object]:
    # Kilo's prompt is ~13k tokens, and its tool_choice "auto" needs a parser, as on a real pod
    return {"max_model_len": 65536, "enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


def post(http: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    response = http.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def forwarded_text(mock_control: MockControl) -> str:
    """The last request the mock received, as the text of its messages."""
    return json.dumps(mock_control.stats()["last_request"]["body"]["messages"])


@pytest.fixture
def http(proxy: LoopbackServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        yield client


def test_kilo_repeated_a_minute_and_a_day_later_is_a_hit_through_the_proxy(
    http: httpx.Client, mock_control: MockControl
) -> None:
    first = post(http, kilo())
    assert first.headers["x-cache"] == "MISS" and first.headers["x-cache-rules"] == "kilo-message-time,kilo-today"
    assert "2026-12-03T18:45:12Z" in forwarded_text(mock_control)
    wait_for_stored(http, 1)

    later = kilo(time="2026-12-03T18:46:12Z")
    assert post(http, later).headers["x-cache"] == "HIT"
    next_day = kilo(time="2026-12-04T09:00:03Z", day="Fri Dec 04 2026")
    hit = post(http, next_day)
    assert hit.headers["x-cache"] == "HIT" and hit.headers["x-cache-key"] == first.headers["x-cache-key"]
    assert mock_control.generations() == 1

    # asked past the cache, the same turn reaches the upstream with its own time and day, byte for byte
    fresh = post(http, next_day, **{"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache-key"] == first.headers["x-cache-key"]
    assert forwarded_text(mock_control) == json.dumps(next_day["messages"])

    wait_for_stored(http, 1)
    entry = http.get("/debug/cache").json()["entries"][0]
    assert entry["key_rules"] == ["kilo-message-time", "kilo-today"]
    stored = json.dumps(http.get(f"/debug/cache/{entry['key']}").json()["request"]["messages"])
    assert "Message time: 2026-12-0" in stored and "\u27e6" not in stored  # as forwarded, not as keyed


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(kilo(time="2026-12-03T18:46:12Z", task='"write bye.py that prints bye"'), id="another task"),
        pytest.param(kilo(time="2026-12-03T18:46:12Z", cwd="/srv/elsewhere"), id="another working directory"),
        pytest.param(kilo(task='"when was 2026-12-03T18:46:12Z?"'), id="a time typed in the question"),
        pytest.param({**kilo(time="2026-12-03T18:46:12Z"), "temperature": 0.2}, id="another temperature"),
        pytest.param({**kilo(time="2026-12-03T18:46:12Z"), "tools": kilo()["tools"][1:]}, id="other tools"),
    ],
)
def test_kilo_turns_that_differ_in_substance_are_misses_through_the_proxy(
    http: httpx.Client, mock_control: MockControl, other: dict[str, Any]
) -> None:
    post(http, kilo(task='"when was 2026-12-03T18:45:12Z?"') if "when was" in json.dumps(other) else kilo())
    wait_for_stored(http, 1)
    assert post(http, other).headers["x-cache"] == "MISS"
    assert mock_control.generations() == 2


@pytest.mark.parametrize("off", ["all", "kilo-message-time"])
def test_rules_switched_off_make_the_later_turn_a_miss(
    start_proxy: ProxyFactory, mock_control: MockControl, off: str
) -> None:
    proxy = start_proxy(key_rules_off=(off,))
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        post(client, kilo())
        wait_for_stored(client, 1)
        later = post(client, kilo(time="2026-12-03T18:46:12Z"))
    assert later.headers["x-cache"] == "MISS"
    assert later.headers.get("x-cache-rules") == (None if off == "all" else "kilo-today")


def test_user_rules_from_pod_config_reach_the_proxy_and_apply(
    tmp_path: Path, mock_vllm: LoopbackServer, mock_control: MockControl
) -> None:
    config = tmp_path / "pod_config.json"
    rule = {"name": "ticket-stamp", "pattern": r"^Stamp: \d+$", "roles": ["user"], "block": "ticket"}
    config.write_text(json.dumps({"provider": "local", "cache_dir": "cache", "cache_key_rules": [rule]}))
    sidecars = Sidecars(load_pod_config(config), config, RuntimePaths(tmp_path), Reporter())
    state = PodState(
        provider="local",
        phase="ready",
        pod_name="llmpod-0123abcd",
        model_id="m",
        served_model="m",
        vllm_api_key="k",
        created_at=0.0,
        expires_at=1.0,
        idle_timeout_seconds=0,
        proxy_port=8000,
        upstream_url=f"{mock_vllm.url}/v1",
    )
    env = sidecars.proxy_env(state)
    assert "ticket-stamp" in env["CACHE_KEY_RULES"]

    def ask(stamp: int) -> dict[str, Any]:
        text = f"close the ticket\n<ticket>\nStamp: {stamp}\n</ticket>"
        return {"model": SHORT_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 20}

    settings = ProxySettings.from_env(env).model_copy(update={"upstream_api_key": None})
    with LoopbackServer(create_app(settings)) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert post(client, ask(1)).headers["x-cache-rules"] == "ticket-stamp"
        wait_for_stored(client, 1)
        assert post(client, ask(2)).headers["x-cache"] == "HIT"
    assert mock_control.generations() == 1


def test_a_bad_rule_in_pod_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "pod_config.json"
    config.write_text(json.dumps({"cache_key_rules": [{"name": "x", "pattern": "a", "block": "<env>"}]}))
    with pytest.raises(ConfigError, match=r"cache_key_rules\[0\]\['block'\].* block is a tag name"):
        load_pod_config(config)
    config.write_text(json.dumps({"cache_key_rules_off": ["no-such-rule"]}))
    with pytest.raises(ConfigError, match="'no-such-rule' is switched off but is no rule"):
        load_pod_config(config)


def test_aider_on_a_new_day_has_the_same_key() -> None:
    session = json.loads((FIXTURES.parents[2] / "bench" / "sessions" / "aider.json").read_text())
    text = json.dumps(session["requests"][0])
    today, tomorrow = (json.loads(text.replace("@@DATE_ISO@@", day)) for day in ("2026-12-03", "2026-12-04"))
    assert key_of(today) == key_of(tomorrow) != cache_key(CHAT, today, KIND)
    assert KeyNormaliser(BUILTIN_RULES).normalise(CHAT, today)[1] == ("aider-current-date",)


def test_legacy_kilo_current_time_is_taken_out_of_its_block_only() -> None:
    def legacy(time: str, typed: str = "") -> dict[str, Any]:
        details = (
            "<environment_details>\n# VSCode Visible Files\n\n# Current Time\n"
            f"Current time in ISO 8601 UTC format: {time}\nUser time zone: Europe/Berlin, UTC+1:00\n"
            "</environment_details>"
        )
        return {"model": "m", "messages": [{"role": "user", "content": f"<task>\nfix it{typed}\n</task>\n{details}"}]}

    assert key_of(legacy("2026-05-02T10:01:04.045Z")) == key_of(legacy("2026-05-03T10:02:05.123Z"))
    typed = "\nCurrent time in ISO 8601 UTC format: 2026-05-02T10:01:04.045Z"
    assert key_of(legacy("2026-05-02T10:01:04.045Z", typed)) != key_of(legacy("2026-05-02T10:01:04.045Z"))


def test_each_built_in_rule_has_a_text_to_look_for_first() -> None:
    # read with the re module's private parser: a Python that changes it makes this fail, not the rules wrong
    assert [required_text(rule.pattern) for rule in BUILTIN_RULES] == [
        "Message time: ",
        "Today's date: ",
        "Today's date: ",
        "- Current date: ",
        "Current time in ISO 8601 UTC format: ",
    ]
    assert required_text(r"(?i)^Stamp: \d+$") == ""  # any case: no text is sure to be there
    assert required_text(r"^(?:Build|Run)-id: \d+$") == "-id: "  # only what every match holds
    assert required_text(r"^x?y$") == "y"
