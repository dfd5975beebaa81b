"""The settings contract between the pod manager and the proxy: ``ProxySettings`` builds the proxy's environment
(``to_env``), which the proxy reads back (``from_env``), and a bad value is refused before any process starts."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from llmpod.errors import ConfigError
from llmpod.pod import PodConfig, processes
from llmpod.pod.progress import Reporter
from llmpod.pod.sidecars import PROXY_OF, Sidecars
from llmpod.pod.state import PodState, RuntimePaths
from llmpod.proxy_settings import ProxySettings

UPSTREAM_KEY = "sk-upstream-not-to-be-seen"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready_state(port: int) -> PodState:
    return PodState(
        provider="local",
        phase="ready",
        pod_name="llmpod-0123abcd",
        model_id="m",
        served_model="m",
        vllm_api_key=UPSTREAM_KEY,
        created_at=0.0,
        expires_at=1.0,
        idle_timeout_seconds=0,
        proxy_port=port,
        upstream_url="http://127.0.0.1:8001/v1",
    )


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    spawned: list[Any] = []

    def spawn(*args: Any, **kwargs: Any) -> None:
        spawned.append(args)
        raise AssertionError("a process was started")

    monkeypatch.setattr(processes, "spawn_detached", spawn)
    return spawned


def test_to_env_is_read_back_by_from_env_exactly() -> None:
    settings = ProxySettings(
        upstream_url="http://10.0.0.5:8001/v1",
        cache_dir=Path("/tmp/c"),
        max_cache_entries=7,
        max_cache_bytes=4096,
        host="127.0.0.2",
        port=8123,
        upstream_api_key=SecretStr("u"),
        proxy_api_key=SecretStr("p"),
        upstream_timeout=12.5,
        log_file=None,
        enable_profiling=True,
        max_body_bytes=2048,
        upstream_tool_calling=False,
        tool_capable_models=("a", "b"),
    )
    for value in (settings, ProxySettings()):
        assert ProxySettings.from_env(value.to_env()) == value


def test_secrets_stay_out_of_the_settings_repr() -> None:
    settings = ProxySettings(upstream_api_key=SecretStr(UPSTREAM_KEY), proxy_api_key=SecretStr("proxy-key-x"))
    shown = repr(settings) + str(settings)
    assert UPSTREAM_KEY not in shown and "proxy-key-x" not in shown
    assert settings.to_env()["UPSTREAM_API_KEY"] == UPSTREAM_KEY  # the process needs it; the env is never logged


def test_the_proxy_env_carries_the_pod_values_and_the_users_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXY_API_KEY", "users-proxy-key")
    monkeypatch.setenv("PROXY_HOST", "0.0.0.0")  # the pod manager's proxy listens on loopback whatever the shell says
    sidecars = Sidecars(PodConfig(max_cache_size=5), tmp_path / "pod_config.json", RuntimePaths(tmp_path), Reporter())

    env = sidecars.proxy_env(ready_state(8000))

    settings = ProxySettings.from_env(env)
    assert settings.max_cache_entries == 5 and settings.host == "127.0.0.1" and settings.port == 8000
    assert settings.proxy_api_key is not None and settings.proxy_api_key.get_secret_value() == "users-proxy-key"
    assert settings.log_file is None and env[PROXY_OF] == str(tmp_path)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"config": {"max_cache_size": 0}}, "MAX_CACHE_SIZE=0 is invalid"),
        ({"config": {"max_cache_bytes": 10}}, "CACHE_SIZE_BYTES=10 is invalid"),
        ({"environ": {"UPSTREAM_TIMEOUT": "soon"}}, "UPSTREAM_TIMEOUT='soon' is invalid"),
        ({"environ": {"MAX_BODY_BYTES": "-1"}}, "MAX_BODY_BYTES='-1' is invalid"),
    ],
)
def test_a_bad_proxy_value_is_one_line_before_any_process_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_spawn: list[Any],
    bad: dict[str, dict[str, Any]],
    named: str,
) -> None:
    for name, value in bad.get("environ", {}).items():
        monkeypatch.setenv(name, value)
    # past PodConfig's own checks (a config built in code, or a check that drifted): the proxy's catch it
    config = PodConfig().model_copy(update=bad.get("config", {}))
    sidecars = Sidecars(config, tmp_path / "pod_config.json", RuntimePaths(tmp_path), Reporter())

    with pytest.raises(ConfigError) as caught:
        sidecars.ensure_proxy(ready_state(free_port()))

    message = str(caught.value)
    assert named in message and "\n" not in message
    assert caught.value.exit_code == 2  # manage_pod.py prints it as one line and exits 2
    assert no_spawn == []
    assert UPSTREAM_KEY not in message


def test_the_proxy_and_mock_packages_state_their_public_names() -> None:
    import llmpod.mock
    import llmpod.proxy
    from llmpod.mock import MockSettings
    from llmpod.mock import create_app as create_mock_app
    from llmpod.proxy import ProxySettings as PublicSettings
    from llmpod.proxy import create_app

    assert llmpod.proxy.__all__ == ["ProxySettings", "create_app"] and PublicSettings is ProxySettings
    assert llmpod.mock.__all__ == ["MockSettings", "create_app"]
    assert callable(create_app) and callable(create_mock_app) and MockSettings().model_dump()
