"""The several-models contract between the pod manager and the proxy (llmpod/backends.py, issue 18)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from llmpod.backends import Backend, BackendState, read_state, write_state
from llmpod.errors import ConfigError
from llmpod.proxy_settings import ProxySettings

KEY = "vllm-key-for-tests-0123456789"


def test_backends_round_trip_through_the_proxy_environment_and_keep_keys_out_of_reprs() -> None:
    chat = Backend(id="qwen-coder", base_url="http://127.0.0.1:8002/v1/", served_model="Qwen/Qwen2.5", api_key=KEY)
    autocomplete = Backend(id="mock-gpt", base_url="http://127.0.0.1:8001/v1", aliases=("fast",), kind="mock")
    env = ProxySettings(backends=(chat, autocomplete)).to_env()
    back = ProxySettings.from_env(env).backends
    assert back == (chat, autocomplete) and back[0].base_url == "http://127.0.0.1:8002/v1"
    assert back[0].upstream_model == "Qwen/Qwen2.5" and back[1].upstream_model == "mock-gpt"
    assert back[0].api_key is not None and back[0].api_key.get_secret_value() == KEY
    assert KEY not in repr(back) and KEY not in str(ProxySettings(backends=back))
    assert ProxySettings.from_env({}).backends == () and ProxySettings().to_env()["PROXY_BACKENDS"] == ""


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("[", "PROXY_BACKENDS is not JSON"),
        ('{"id": "a"}', "must be a JSON list"),
        ('[{"id": "a b", "base_url": "http://x/v1"}]', "model 'a b': id:"),
        ('[{"id": "a", "base_url": "ftp://x"}]', "model 'a': base_url:"),
        ('[{"id": "a", "base_url": "http://x/v1", "colour": 1}]', "model 'a': colour:"),
        (
            '[{"id": "a", "base_url": "http://x/v1"}, {"id": "b", "base_url": "http://y/v1", "aliases": ["a"]}]',
            "a more",
        ),
    ],
)
def test_a_bad_backend_list_is_one_line_naming_the_model(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ProxySettings.from_env({"PROXY_BACKENDS": value})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_state_files_are_private_whole_and_unknown_when_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "mock-gpt.state.json"
    assert read_state(path) is None
    write_state(path, BackendState(state="restarting", restarts=2, last_error="exited with status 1"))
    state = read_state(path)
    assert state is not None and (state.state, state.restarts) == ("restarting", 2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text('{"state": "half')
    assert read_state(path) is None
