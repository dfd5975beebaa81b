"""pod_config.json: defaults, every key, and a one-line ConfigError (file, key, value) for every bad file."""

from __future__ import annotations

import json
import random
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from llmpod._net import free_port
from llmpod.errors import ConfigError
from llmpod.pod import PodConfig, load_pod_config
from llmpod.pod.config import FIELDS, MOCK_SERVER, REPO_ROOT, check_port_free

SHIPPED = REPO_ROOT / "pod_config.json"
SECRET = "hf_FAKE-test-token-0123456789abcdefXYZ"  # shaped like a token, obviously fake

# every key with a value that is valid and not the default
EVERY_KEY: dict[str, Any] = {
    "modelStoreId": "qwen2.5-coder-7b-instruct",
    "gpu_type_id": "NVIDIA L40S",
    "runtime_seconds": 120,
    "template_id": "vllm",
    "proxy_port": 9123,
    "cache_dir": "/var/tmp/answers",
    "max_cache_size": 25,
    "max_cache_bytes": 4096,
    "enable_profiling": True,
    "cache_key_rules": [
        {"name": "my-stamp", "pattern": "^Stamp: \\d+$", "roles": ["user"], "block": "meta", "description": "ours"}
    ],
    "cache_key_rules_off": ["continue-today"],
    "provider": "local",
    "gpu_type_ids": ["NVIDIA A40", "NVIDIA RTX A6000"],
    "cloud_type": "COMMUNITY",
    "image": "registry.example.com:5000/vllm/vllm-openai:v0.26.0",
    "min_cuda_version": "13.0",
    "container_disk_gb": 80,
    "max_model_len": 4096,
    "vllm_args": ["--enable-prefix-caching", "--gpu-memory-utilization", "0.85"],
    "hf_token_env": "MY_HF_TOKEN",
    "idle_timeout_seconds": 0,
    "max_hourly_cost": 0.8,
    "ready_timeout_seconds": 5,
    "watchdog_interval_seconds": 0.05,
    "command": ["python3", "my_server.py"],
    "args": [
        "--port",
        "{port}",
        "--model",
        "{model}",
        "--served-model-name",
        "{served_model_name}",
        "--max-model-len",
        "{max_model_len}",
        "{{literal}}",
    ],
    "env": {"MOCK_CHUNK_DELAY": "0", "lower_case_ok": "1"},
    "llmModels": {"docs": {"endpoints": {"base_url": "http://10.0.0.5:8000/v1"}}},
}


def write(tmp_path: Path, content: str | bytes | dict[str, Any] | list[Any]) -> Path:
    path = tmp_path / "pod_config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    """The message of the ConfigError for ``path``, checked to be one line that names the file."""
    with pytest.raises(ConfigError) as excinfo:
        load_pod_config(path)
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: ")
    return message


# ------------------------------------------------------------------------------------------------ good files
def test_the_shipped_file_holds_every_key_with_its_default() -> None:
    assert list(json.loads(SHIPPED.read_text())) == list(FIELDS)
    assert load_pod_config(SHIPPED) == PodConfig()


def test_defaults() -> None:
    config = PodConfig()

    assert config.modelStoreId == "qwen2.5-coder-32b-instruct-awq"  # calls tools: agents work on the default
    assert config.gpu_type_id == "NVIDIA RTX A6000"
    assert (config.runtime_seconds, config.proxy_port, config.max_cache_size) == (28800, 8000, 1000)
    assert (config.cache_dir, config.max_cache_bytes, config.enable_profiling) == ("/tmp/llm_cache", 1 << 30, False)
    assert (config.provider, config.cloud_type, config.image) == ("runpod", "SECURE", "vllm/vllm-openai:v0.33.0")
    assert config.template_id is None and config.max_model_len is None and config.max_hourly_cost is None
    assert config.hf_token_env == "HF_TOKEN"
    assert config.local_command == [sys.executable, "-m", "llmpod.mock"] == [sys.executable, *MOCK_SERVER]


def test_every_key_round_trips(tmp_path: Path) -> None:
    assert set(EVERY_KEY) == set(FIELDS)
    config = load_pod_config(write(tmp_path, EVERY_KEY))

    assert config.model_dump() == EVERY_KEY
    assert all(config.model_dump()[key] != value for key, value in PodConfig().model_dump().items())
    assert config.local_command == ["python3", "my_server.py"]


def test_the_original_test_plans_example_loads(tmp_path: Path) -> None:
    example = {
        "modelStoreId": "deepseek-ai/deepseek-coder-33b-awq",
        "gpu_type_id": "NVIDIA RTX A6000",
        "runtime_seconds": 1800,
        "template_id": "vllm",
        "proxy_port": 8000,
        "cache_dir": "/tmp/llm_cache",
        "max_cache_size": 1000,
        "max_cache_bytes": 1073741824,
        "enable_profiling": True,
    }
    config = load_pod_config(write(tmp_path, example))

    assert config.model_dump(include=set(example)) == example
    assert config.provider == "runpod" and config.image == "vllm/vllm-openai:v0.33.0"


def test_a_byte_order_mark_and_lower_case_cloud_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, b'\xef\xbb\xbf{"cloud_type": "community"}')
    assert load_pod_config(path).cloud_type == "COMMUNITY"


@pytest.mark.parametrize(
    "image", ["vllm/vllm-openai:v0.10.1.1", "localhost:5000/vllm:v1", "vllm/vllm-openai@sha256:" + "a" * 64]
)
def test_pinned_images_are_accepted(tmp_path: Path, image: str) -> None:
    assert load_pod_config(write(tmp_path, {"image": image})).image == image


def test_gpu_candidates_keep_order_and_drop_duplicates() -> None:
    config = PodConfig(
        gpu_type_id="NVIDIA L40S", gpu_type_ids=["NVIDIA A40", "NVIDIA L40S", "NVIDIA RTX A6000", "NVIDIA A40"]
    )

    assert config.gpu_candidates == ["NVIDIA L40S", "NVIDIA A40", "NVIDIA RTX A6000"]
    assert PodConfig().gpu_candidates == ["NVIDIA RTX A6000", "NVIDIA L40S", "NVIDIA A40"]


def test_the_config_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        PodConfig().proxy_port = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- missing file
def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    message = config_error(tmp_path / "pod_config.json")
    assert "no such file" in message and "README.md" in message


def test_a_missing_file_gives_the_defaults_when_allowed(tmp_path: Path) -> None:
    assert load_pod_config(tmp_path / "absent.json", missing_ok=True) == PodConfig()


def test_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pod_config.json").mkdir()
    assert "is a directory" in config_error(tmp_path / "pod_config.json")


# ----------------------------------------------------------------------------------------------- bad files
BAD_FILES: list[tuple[str, str | bytes, str]] = [
    ("empty", "", "is empty"),
    ("whitespace", " \n\t\n", "is empty"),
    ("truncated", '{"modelStoreId": "deepseek-coder-33b-instruct-awq",\n "proxy_port": 80', "line 2, column"),
    ("cut mid-string", '{"modelStoreId": "deeps', "invalid JSON at line 1"),
    ("trailing comma", '{"proxy_port": 8000,\n}', "no comma before a closing bracket"),
    ("comment", '{\n  // the model\n  "proxy_port": 8000\n}', "JSON has no comments"),
    ("single quotes", "{'proxy_port': 8000}", "double quotes"),
    ("python literal", '{"enable_profiling": True}', "column 22: Expecting value (JSON writes true"),
    ("NaN", '{"max_hourly_cost": NaN}', "NaN is not a JSON number"),
    ("Infinity", '{"max_hourly_cost": Infinity}', "Infinity is not a JSON number"),
    ("duplicate key", '{"proxy_port": 8000, "proxy_port": 9000}', "key proxy_port appears more than once"),
    ("array", '["modelStoreId"]', "must hold a JSON object {...} at the top level, not an array"),
    ("string", '"pod"', "not a string"),
    ("number", "42", "not a number"),
    ("null", "null", "not null"),
    ("not UTF-8", b'{"cache_dir": "/tmp/\xff"}', "is not UTF-8 text"),
    ("binary", bytes(range(256)), "is not UTF-8 text"),
    ("deep nesting", "[" * 100_000, "nested too deeply"),
    ("unknown key", '{"runtime_second": 60}', "unknown key runtime_second=60 (did you mean runtime_seconds?)"),
    ("wrong case key", '{"ModelStoreID": "x"}', "(did you mean modelStoreId?)"),
    ("alias key", '{"model": "x"}', "unknown key model='x' (did you mean modelStoreId?)"),
    ("nonsense key", '{"zzz": 1}', "unknown key zzz=1 (see README.md"),
    ("runtime text", '{"runtime_seconds": "soon"}', "runtime_seconds='soon' is not an integer"),
    ("runtime numeric text", '{"runtime_seconds": "3600"}', "runtime_seconds='3600' is not an integer"),
    ("runtime float", '{"runtime_seconds": 60.5}', "runtime_seconds=60.5 is not an integer"),
    ("runtime bool", '{"runtime_seconds": true}', "runtime_seconds=True is not an integer"),
    ("runtime zero", '{"runtime_seconds": 0}', "runtime_seconds=0 must be at least 1"),
    ("runtime a month", '{"runtime_seconds": 2592000}', "runtime_seconds=2592000 must be at most 604800"),
    ("port zero", '{"proxy_port": 0}', "proxy_port=0 must be at least 1"),
    ("port too big", '{"proxy_port": 65536}', "proxy_port=65536 must be at most 65535"),
    ("port null", '{"proxy_port": null}', "proxy_port=None is not an integer"),
    ("idle negative", '{"idle_timeout_seconds": -1}', "idle_timeout_seconds=-1 must be at least 0"),
    ("disk small", '{"container_disk_gb": 5}', "container_disk_gb=5 must be at least 10"),
    ("cache size zero", '{"max_cache_size": 0}', "max_cache_size=0 must be at least 1"),
    ("cache bytes tiny", '{"max_cache_bytes": 1}', "max_cache_bytes=1 must be at least 1024"),
    ("profiling text", '{"enable_profiling": "yes"}', "enable_profiling='yes' is not true or false"),
    ("profiling one", '{"enable_profiling": 1}', "enable_profiling=1 is not true or false"),
    ("cost text", '{"max_hourly_cost": "1.5"}', "max_hourly_cost='1.5' is not a number or null"),
    ("cost zero", '{"max_hourly_cost": 0}', "max_hourly_cost=0 must be more than 0"),
    ("watchdog zero", '{"watchdog_interval_seconds": 0}', "watchdog_interval_seconds=0 must be more than 0"),
    ("max_model_len tiny", '{"max_model_len": 16}', "max_model_len=16 must be at least 128"),
    ("model empty", '{"modelStoreId": ""}', "modelStoreId='' must not be empty"),
    ("model number", '{"modelStoreId": 33}', "modelStoreId=33 is not a string"),
    ("model padded", '{"modelStoreId": " qwen "}', "modelStoreId=' qwen ' must not be blank"),
    ("gpu list not list", '{"gpu_type_ids": "NVIDIA A40"}', "gpu_type_ids='NVIDIA A40' is not a list"),
    ("gpu list item", '{"gpu_type_ids": ["NVIDIA A40", 7]}', "gpu_type_ids[1]=7 is not a string"),
    ("gpu list blank", '{"gpu_type_ids": [" "]}', "gpu_type_ids must not contain blank GPU type ids"),
    ("provider", '{"provider": "aws"}', "provider='aws' must be 'runpod' or 'local'"),
    ("cloud", '{"cloud_type": "spot"}', "cloud_type='spot' must be 'SECURE' or 'COMMUNITY'"),
    ("image latest", '{"image": "vllm/vllm-openai:latest"}', "image='vllm/vllm-openai:latest' must pin a version"),
    ("image untagged", '{"image": "vllm/vllm-openai"}', "image='vllm/vllm-openai' has no tag"),
    ("image registry port only", '{"image": "localhost:5000/vllm"}', "has no tag"),
    ("image empty tag", '{"image": "vllm/vllm-openai:"}', "must pin a version"),
    ("image spaces", '{"image": "vllm/vllm openai:v1"}', "without spaces"),
    ("hf_token_env lower", '{"hf_token_env": "hf-token"}', "hf_token_env='hf-token' must be an environment variable"),
    ("hf_token_env digit", '{"hf_token_env": "1TOKEN"}', "must be an environment variable name"),
    ("vllm_args model", '{"vllm_args": ["--model", "x"]}', "vllm_args must not contain --model: use the modelStoreId"),
    ("vllm_args len", '{"vllm_args": ["--max-model-len=8192"]}', "use the max_model_len key instead"),
    ("vllm_args port", '{"vllm_args": ["--port", "1"]}', "must not contain --port: manage_pod.py sets it itself"),
    ("vllm_args item", '{"vllm_args": [1]}', "vllm_args[0]=1 is not a string"),
    (
        "vllm_args parser twice",
        '{"vllm_args": ["--tool-call-parser", "hermes", "--tool-call-parser=pythonic"]}',
        "vllm_args gives --tool-call-parser more than once",
    ),
    (
        "vllm_args parser no value",
        '{"vllm_args": ["--tool-call-parser", "--enable-prefix-caching"]}',
        "vllm_args gives --tool-call-parser without a value",
    ),
    ("vllm_args template last", '{"vllm_args": ["--chat-template"]}', "gives --chat-template without a value"),
    (
        "vllm_args tools off",
        '{"vllm_args": ["--no-enable-auto-tool-choice"]}',
        "must not contain --no-enable-auto-tool-choice: manage_pod.py turns tool calling on",
    ),
    ("command empty", '{"command": []}', "command=[] must not be empty"),
    ("command string", '{"command": "python3 x.py"}', "command='python3 x.py' is not a list or null"),
    ("command blank item", '{"command": [""]}', "command must not contain blank items"),
    ("args placeholder", '{"args": ["--port", "{prot}"]}', "args uses an unknown placeholder {prot} in '{prot}'"),
    ("args brace", '{"args": ["{port"]}', "args has a malformed placeholder in '{port'"),
    ("env not object", '{"env": ["A=1"]}', "env is not an object"),
    ("env value", '{"env": {"A": 1}}', "env['A'] is not a string"),
    ("env name", '{"env": {"A B": "1"}}', "env has 'A B', which is not an environment variable name"),
    (
        "two problems",
        '{"proxy_port": 0, "runtime_seconds": 0}',
        "runtime_seconds=0 must be at least 1 (and 1 more problem)",
    ),
    ("three problems", '{"proxy_port": 0, "runtime_seconds": 0, "provider": 1}', "(and 2 more problems)"),
]


@pytest.mark.parametrize(("content", "expected"), [case[1:] for case in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_one_line_config_errors(tmp_path: Path, content: str | bytes, expected: str) -> None:
    assert expected in config_error(write(tmp_path, content))


@pytest.mark.parametrize("hf_token_env", [SECRET, "hf_short"])
def test_a_token_written_instead_of_its_variable_name_is_not_echoed(tmp_path: Path, hf_token_env: str) -> None:
    message = config_error(write(tmp_path, {"hf_token_env": hf_token_env}))
    assert hf_token_env not in message
    assert "hf_token_env" in message


@pytest.mark.parametrize(
    "document",
    [
        {"env": {"HF_TOKEN": SECRET, "bad name": SECRET}},
        {"env": [f"HF_TOKEN={SECRET}"]},
        {"hf_token": SECRET},
        {"vllm_args": ["--api-key", SECRET]},
        {"command": f"serve --token {SECRET}"},
    ],
)
def test_secrets_are_not_echoed(tmp_path: Path, document: dict[str, Any]) -> None:
    message = config_error(write(tmp_path, document))
    assert SECRET not in message and SECRET[:10] not in message


def test_a_long_value_is_shortened(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, {"cache_dir": 7, "modelStoreId": "x" * 500}))
    assert len(message) < 200 and message.count("x") < 80


# ------------------------------------------------------------------------------------- fuzzed, hand-edited files
def _mutations(seed: int, count: int) -> list[bytes]:
    """Files a person (or a crash) could leave: the shipped file with characters cut, doubled, swapped or
    replaced, cut short, or with a value replaced by another JSON value."""
    rng = random.Random(seed)
    original = SHIPPED.read_bytes()
    odd_values: list[Any] = [
        None,
        True,
        False,
        0,
        -1,
        1.5,
        1e308,
        "",
        " ",
        "x",
        "{port}",
        [],
        [1],
        {},
        {"a": "b"},
        2**70,
        "vllm/vllm-openai:latest",
        ["--model"],
        "\u00e9\n\t",
    ]
    results = []
    for _ in range(count):
        data = bytearray(original)
        kind = rng.randrange(5)
        if kind == 0:  # cut short
            data = data[: rng.randrange(len(data))]
        elif kind == 1:  # delete a few characters
            for _ in range(rng.randint(1, 3)):
                del data[rng.randrange(len(data))]
        elif kind == 2:  # insert a few structural characters
            for _ in range(rng.randint(1, 3)):
                data.insert(rng.randrange(len(data)), rng.choice(b"{}[],:\"\\/#' 0\x00\xff"))
        elif kind == 3:  # replace a value
            document = json.loads(original)
            document[rng.choice(list(document))] = rng.choice(odd_values)
            data = bytearray(json.dumps(document).encode())
        else:  # rename a key slightly
            document = json.loads(original)
            key = rng.choice(list(document))
            document[key[:-1] + rng.choice("sSx_")] = document.pop(key)
            data = bytearray(json.dumps(document).encode())
        results.append(bytes(data))
    return results


@pytest.mark.parametrize("seed", range(8))
def test_fuzzed_files_load_or_raise_one_line_config_errors(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "pod_config.json"
    failures = 0
    for content in _mutations(seed, 60):
        path.write_bytes(content)
        try:
            load_pod_config(path)
        except ConfigError as exc:
            failures += 1
            assert "\n" not in str(exc) and str(exc).startswith(f"{path}: ")
    assert failures > 0


# ------------------------------------------------------------------------------------------------ the port
def test_check_port_free_on_a_bound_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^proxy_port {port} is in use by another program: "):
            check_port_free(port)


def test_check_port_free_on_a_free_port() -> None:
    check_port_free(free_port())  # bound and closed again: free


# ------------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("cache", "{folder}/cache"),
        ("./answers/../cache", "{folder}/cache"),
        ("~/llm-cache", "{home}/llm-cache"),
        ("/var/tmp/answers", "/var/tmp/answers"),
    ],
)
def test_cache_dir_is_resolved_against_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str, expected: str
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    folder = tmp_path / "project"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where manage_pod.py is started does not matter
    path = write(folder, {"cache_dir": written})

    assert load_pod_config(path).cache_dir == expected.format(folder=folder, home=home)
    assert load_pod_config(Path("..") / "project" / "pod_config.json").cache_dir == expected.format(
        folder=folder, home=home
    )
