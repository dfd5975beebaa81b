"""Proxy settings from the environment: names, defaults, overrides, URL forms and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmpod.errors import ConfigError
from llmpod.proxy import ProxySettings
from llmpod.proxy.settings import GIB, MIB, is_loopback, upstream_base

SECRET = "sk-live-0123456789abcdef"  # a value that must never be echoed back


def config_error(environ: dict[str, str], **overrides: Any) -> str:
    """The message of the ConfigError that ``from_env`` raises for ``environ``."""
    with pytest.raises(ConfigError) as excinfo:
        ProxySettings.from_env(environ, **overrides)
    return str(excinfo.value)


# --------------------------------------------------------------------------------------------- defaults and names
def test_defaults_with_an_empty_environment() -> None:
    settings = ProxySettings.from_env({})

    assert settings.upstream_url == "http://127.0.0.1:8001/v1"
    assert settings.upstream_base == "http://127.0.0.1:8001/v1"
    assert settings.upstream_root == "http://127.0.0.1:8001"
    assert settings.cache_dir == Path("/tmp/llm_cache")
    assert settings.max_cache_entries == 1000
    assert settings.max_cache_bytes == GIB
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.upstream_api_key is None
    assert settings.proxy_api_key is None
    assert settings.upstream_timeout == 300.0
    assert settings.log_file == Path("/tmp/proxy_fastapi.log")
    assert settings.enable_profiling is False
    assert settings.max_body_bytes == 32 * MIB


def test_every_environment_variable_is_read(tmp_path: Path) -> None:
    environ = {
        "RUNPOD_ENDPOINT": "https://abc123-8000.proxy.runpod.net/v1",
        "CACHE_DIR": str(tmp_path / "answers"),
        "MAX_CACHE_SIZE": "25",
        "CACHE_SIZE_BYTES": "4096",
        "PROXY_HOST": "::1",
        "PROXY_PORT": "9123",
        "UPSTREAM_API_KEY": "sk-upstream",
        "PROXY_API_KEY": "sk-proxy",
        "UPSTREAM_TIMEOUT": "12.5",
        "LOG_FILE": str(tmp_path / "proxy.log"),
        "ENABLE_PROFILING": "true",
        "MAX_BODY_BYTES": "2048",
    }

    settings = ProxySettings.from_env(environ)

    assert settings.upstream_url == "https://abc123-8000.proxy.runpod.net/v1"
    assert settings.cache_dir == tmp_path / "answers"
    assert settings.max_cache_entries == 25
    assert settings.max_cache_bytes == 4096
    assert settings.host == "::1"
    assert settings.port == 9123
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "sk-upstream"
    assert settings.proxy_api_key is not None
    assert settings.proxy_api_key.get_secret_value() == "sk-proxy"
    assert settings.upstream_timeout == 12.5
    assert settings.log_file == tmp_path / "proxy.log"
    assert settings.enable_profiling is True
    assert settings.max_body_bytes == 2048


def test_without_an_explicit_mapping_the_process_environment_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXY_PORT", "9555")

    settings = ProxySettings.from_env()

    assert settings.port == 9555
    assert settings.cache_dir == tmp_path / "default_cache"  # set by conftest's clean_environ


def test_an_explicit_mapping_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_PORT", "9555")
    assert ProxySettings.from_env({}).port == 8000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        (" On ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_enable_profiling_spellings(value: str, expected: bool) -> None:
    assert ProxySettings.from_env({"ENABLE_PROFILING": value}).enable_profiling is expected


@pytest.mark.parametrize("value", ["", "-"])
def test_empty_log_file_means_no_log_file(value: str) -> None:
    assert ProxySettings.from_env({"LOG_FILE": value}).log_file is None


# --------------------------------------------------------------------------------------------- overrides
def test_overrides_win_over_the_environment(tmp_path: Path) -> None:
    environ = {
        "PROXY_PORT": "9000",
        "ENABLE_PROFILING": "1",
        "CACHE_DIR": str(tmp_path / "env"),
        "MAX_CACHE_SIZE": "10",
    }

    settings = ProxySettings.from_env(
        environ, port=9100, enable_profiling=False, cache_dir=tmp_path / "flag", max_cache_entries=20
    )

    assert settings.port == 9100
    assert settings.enable_profiling is False
    assert settings.cache_dir == tmp_path / "flag"
    assert settings.max_cache_entries == 20


def test_an_override_of_none_leaves_the_environment_value() -> None:
    # a CLI flag that was not given arrives as None
    settings = ProxySettings.from_env({"PROXY_PORT": "9000"}, port=None, host=None)
    assert settings.port == 9000
    assert settings.host == "127.0.0.1"


def test_overrides_are_validated_too() -> None:
    message = config_error({}, port=70000)
    assert "PROXY_PORT" in message
    assert "70000" in message


# --------------------------------------------------------------------------------------------- upstream URLs
@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5:8001/v1/chat/completions",
        "http://10.0.0.5:8001/v1/completions",
        "http://10.0.0.5:8001/v1/models",
        "http://10.0.0.5:8001/v1",
        "http://10.0.0.5:8001/v1/",
        "http://10.0.0.5:8001",
        "http://10.0.0.5:8001/",
        "  http://10.0.0.5:8001/v1/chat/completions  ",
    ],
)
def test_runpod_endpoint_forms_give_the_same_base_and_root(url: str) -> None:
    settings = ProxySettings.from_env({"RUNPOD_ENDPOINT": url})

    assert settings.upstream_base == "http://10.0.0.5:8001/v1"
    assert settings.upstream_root == "http://10.0.0.5:8001"
    assert upstream_base(url) == "http://10.0.0.5:8001/v1"


def test_runpod_proxy_url_keeps_https_and_host() -> None:
    settings = ProxySettings.from_env({"RUNPOD_ENDPOINT": "https://abc123-8000.proxy.runpod.net/v1/chat/completions"})

    assert settings.upstream_base == "https://abc123-8000.proxy.runpod.net/v1"
    assert settings.upstream_root == "https://abc123-8000.proxy.runpod.net"


def test_a_path_prefix_before_v1_is_kept() -> None:
    settings = ProxySettings.from_env({"RUNPOD_ENDPOINT": "http://gateway:8080/llm/v1/chat/completions"})

    assert settings.upstream_base == "http://gateway:8080/llm/v1"
    assert settings.upstream_root == "http://gateway:8080/llm"


# --------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PROXY_PORT", "abc"),
        ("PROXY_PORT", "0"),
        ("PROXY_PORT", "70000"),
        ("MAX_CACHE_SIZE", "-1"),
        ("MAX_CACHE_SIZE", "lots"),
        ("CACHE_SIZE_BYTES", "10"),
        ("MAX_BODY_BYTES", "1.5"),
        ("ENABLE_PROFILING", "maybe"),
        ("RUNPOD_ENDPOINT", "ftp://x"),
        ("RUNPOD_ENDPOINT", "nonsense"),
        ("RUNPOD_ENDPOINT", "http://"),
        ("UPSTREAM_TIMEOUT", "0"),
        ("UPSTREAM_TIMEOUT", "-5"),
        ("UPSTREAM_TIMEOUT", "soon"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable_and_the_value(name: str, value: str) -> None:
    message = config_error({name: value})

    assert "\n" not in message
    assert name in message
    assert repr(value) in message


@pytest.mark.parametrize(("value", "kind"), [("mock", "mock"), (" VLLM ", "vllm"), ("", None)])
def test_upstream_kind_spellings(value: str, kind: str | None) -> None:
    settings = ProxySettings.from_env({"UPSTREAM_KIND": value})
    assert settings.upstream_kind == kind
    assert ProxySettings.from_env(settings.to_env()).upstream_kind == kind  # the pod manager's round trip


def test_an_unknown_upstream_kind_is_one_line_naming_the_variable() -> None:
    message = config_error({"UPSTREAM_KIND": "sglang"})
    assert "\n" not in message and "UPSTREAM_KIND='sglang'" in message and "'mock' or 'vllm'" in message


def test_a_bad_value_with_a_newline_still_gives_one_line() -> None:
    message = config_error({"PROXY_PORT": "80\n81"})
    assert "\n" not in message
    assert "PROXY_PORT" in message


def test_config_error_is_the_config_exit_code() -> None:
    with pytest.raises(ConfigError) as excinfo:
        ProxySettings.from_env({"PROXY_PORT": "abc"})
    assert excinfo.value.exit_code == 2


# --------------------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("field", ["upstream_api_key", "proxy_api_key"])
@pytest.mark.parametrize("bad", [12345678901234, ["sk-live-in-a-list-0123"], {"key": "sk-live-in-a-dict-0123"}])
def test_a_bad_secret_is_named_but_never_shown(field: str, bad: Any) -> None:
    message = config_error({}, **{field: bad})

    assert "\n" not in message
    assert ("PROXY_API_KEY" if field == "proxy_api_key" else "UPSTREAM_API_KEY") in message
    assert str(bad) not in message
    assert "0123" not in message


def test_secrets_are_not_shown_when_another_value_is_bad() -> None:
    message = config_error({"UPSTREAM_API_KEY": SECRET, "PROXY_API_KEY": SECRET, "PROXY_PORT": "abc"})
    assert SECRET not in message


def test_secrets_are_hidden_in_repr_and_str() -> None:
    settings = ProxySettings.from_env({"UPSTREAM_API_KEY": SECRET, "PROXY_API_KEY": SECRET + "-proxy"})

    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == SECRET


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_secret_means_no_secret(blank: str) -> None:
    settings = ProxySettings.from_env({"UPSTREAM_API_KEY": blank, "PROXY_API_KEY": blank})
    assert settings.upstream_api_key is None
    assert settings.proxy_api_key is None


# --------------------------------------------------------------------------------------------- bind safety
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "pod.example.com"])
def test_a_network_host_without_a_proxy_key_is_refused(host: str) -> None:
    message = config_error({"PROXY_HOST": host})

    assert "\n" not in message
    assert f"PROXY_HOST={host}" in message
    assert "PROXY_API_KEY" in message


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20"])
def test_a_network_host_with_a_proxy_key_is_allowed(host: str) -> None:
    settings = ProxySettings.from_env({"PROXY_HOST": host, "PROXY_API_KEY": SECRET})
    assert settings.host == host


def test_a_blank_proxy_key_does_not_unlock_a_network_host() -> None:
    message = config_error({"PROXY_HOST": "0.0.0.0", "PROXY_API_KEY": "  "})
    assert "PROXY_API_KEY" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_a_loopback_host_needs_no_key(host: str) -> None:
    assert ProxySettings.from_env({"PROXY_HOST": host}).host == host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected
