"""``manage_pod.py`` in-process (llmpod.pod.cli.main): what is checked before any network call, what still works
with a config the catalog refuses, and what a refresh does when RunPod cannot be reached."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpod.pod import cli
from llmpod.pod.providers import CreatePodRequest, GpuRequest, RunPodClient
from llmpod.pod.state import PodState, RuntimePaths, load_state, save_state
from tests.fakes.fake_runpod import FakeRunPod, FakeRunPodSettings, create_app
from tests.support.servers import LoopbackServer, free_port

KEY = "rpa_fake_key_for_the_cli_tests"
UNREACHABLE = "https://runpod.unreachable.test"


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("RUNPOD_API_BASE", "RUNPOD_POD_URL_TEMPLATE", "PROXY_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.setenv("HF_API_BASE", "https://hub.unreachable.test")
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)  # main() turns SIGTERM into Ctrl-C for the rest of the process


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every HTTP request the program sends; none gets through: the network is down (connection refused)."""
    requests: list[str] = []

    def refuse(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        requests.append(f"{request.method} {request.url}")
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    monkeypatch.setattr(httpx.Client, "send", refuse)
    monkeypatch.setenv("RUNPOD_API_BASE", UNREACHABLE)
    return requests


def write_config(tmp_path: Path, **settings: Any) -> Path:
    path = tmp_path / "pod_config.json"
    path.write_text(json.dumps({"proxy_port": free_port(), "cache_dir": str(tmp_path / "cache"), **settings}))
    return path


def run(config: Path, *args: str) -> int:
    return cli.main(["--config", str(config), *args])


# ----------------------------------------------------------------------------- checked before the network
@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"modelStoreId": "deepseek-coder-34b"}, "unknown modelStoreId 'deepseek-coder-34b': did you mean "),
        (
            {"modelStoreId": "qwen3-coder-30b-a3b-instruct", "gpu_type_id": "NVIDIA A100 80GB PCIe"},
            "model qwen3-coder-30b-a3b-instruct needs about 66 GB of container disk (61 GB of weights + 5 GB "
            "headroom), but container_disk_gb is 60: set container_disk_gb to at least 66 in pod_config.json",
        ),
    ],
    ids=["unknown-model", "disk-too-small"],
)
def test_a_config_the_catalog_refuses_is_exit_2_before_any_network_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sent: list[str], settings: dict[str, Any], words: str
) -> None:
    """RUNPOD_API_KEY is set and RunPod cannot be reached: the config's own problem is what the user sees, at
    once, not a network error after the retries."""
    assert run(write_config(tmp_path, **settings)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"manage_pod.py: {words}") and len(err.strip().splitlines()) == 1
    assert sent == []


def test_candidates_the_model_cannot_use_are_named_and_none_left_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sent: list[str]
) -> None:
    """A refreshed catalog offers a V100 (compute capability 7.0); vLLM 0.33 runs AWQ from 7.5 only."""
    cache = tmp_path / ".llmpod" / "catalog.json"
    cache.parent.mkdir()
    cache.write_text(
        json.dumps(
            {
                "version": 1,
                "models": [],
                "models_source": "built-in",
                "gpus_source": "runpod",
                "refreshed_at": 1.0,
                "gpus": [{"id": "Tesla V100-SXM2-32GB", "name": "Tesla V100", "memory_gb": 32, "price_secure": 0.2}],
            }
        )
    )
    config = write_config(
        tmp_path, modelStoreId="qwen2.5-coder-14b-instruct-awq", gpu_type_id="Tesla V100-SXM2-32GB", gpu_type_ids=[]
    )
    assert run(config) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "GPU Tesla V100-SXM2-32GB skipped: vLLM 0.33 runs AWQ weights from compute capability 7.5; "
        "Tesla V100-SXM2-32GB has compute capability 7.0, Volta",
        "manage_pod.py: no GPU candidate can serve model qwen2.5-coder-14b-instruct-awq: Tesla V100-SXM2-32GB: "
        "vLLM 0.33 runs AWQ weights from compute capability 7.5; Tesla V100-SXM2-32GB has compute capability 7.0, "
        "Volta",
    ]
    assert sent == []


# ------------------------------------------------------------------------ a pod may be billing: still works
@pytest.fixture
def runpod(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LoopbackServer, FakeRunPod]]:
    app = create_app(FakeRunPodSettings(api_key=KEY))
    with LoopbackServer(app) as server:
        monkeypatch.setenv("RUNPOD_API_BASE", server.url)
        yield server, app.state.fake


def recorded_pod(tmp_path: Path, server: LoopbackServer, model: str) -> str:
    """A pod made on the fake and recorded in pod_state.json, as a run that made it leaves it."""
    request = CreatePodRequest(
        name="llmpod-c0ffee00",
        image="vllm/vllm-openai:v0.33.0",
        gpu=GpuRequest(id="NVIDIA L40S"),
        ports=["8000/http"],
        args=f"--model {model}",
    )
    with RunPodClient(KEY, server.url) as client:
        pod = client.create_pod(request)
    now = time.time()
    save_state(
        RuntimePaths(tmp_path),
        PodState(
            provider="runpod",
            phase="ready",
            pod_name=pod.name,
            pod_id=pod.id,
            model_id=model,
            served_model=model,
            vllm_api_key="vllm-key",
            created_at=now,
            expires_at=now + 3600,
            idle_timeout_seconds=0,
            proxy_port=1,
        ),
    )
    return pod.id


def test_status_and_shutdown_work_with_a_config_the_catalog_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runpod: tuple[LoopbackServer, FakeRunPod]
) -> None:
    """The config was edited to a model that does not exist after the pod was made: the pod still bills, and
    --status and --shutdown must still reach it."""
    server, fake = runpod
    pod_id = recorded_pod(tmp_path, server, "deepseek-coder-33b-instruct-awq")
    config = write_config(tmp_path, modelStoreId="deepseek-coder-34b")

    assert run(config, "--status") == 0
    assert pod_id in capsys.readouterr().out
    assert run(config, "--shutdown") == 0
    assert pod_id in capsys.readouterr().out
    assert fake.pods[pod_id].gone and load_state(RuntimePaths(tmp_path)) is None


# ------------------------------------------------------------------------------------ --refresh-catalog
def test_refresh_catalog_keeps_the_builtin_data_when_runpod_cannot_be_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sent: list[str]
) -> None:
    """README: "when either does not answer, the cached or built-in data is kept and the output says so".
    One try at RunPod, no key check first, one warning line, exit 0."""
    assert run(write_config(tmp_path), "--refresh-catalog") == 0
    out, err = capsys.readouterr()
    assert [request for request in sent if request.startswith(f"GET {UNREACHABLE}")] == [
        f"GET {UNREACHABLE}/v2/catalog/gpus?include=AVAILABILITY&product=POD&cloud=SECURE&minCudaVersion=13.0"
    ]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: RunPod did not list its GPU types (RunPodUnavailable: RunPod GET /v2/catalog/gpus: "
        f"cannot reach {UNREACHABLE}: connection refused): using the built-in GPU list"
    ]
    assert "NVIDIA RTX A6000" in out  # the built-in GPU list is shown
    cached = json.loads((tmp_path / ".llmpod" / "catalog.json").read_text())
    assert cached["gpus_source"] == "built-in"
