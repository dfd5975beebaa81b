"""The CUDA floor of an image (llmpod.pod.images), the ``min_cuda_version`` key that states it for other images, and
what llmpod sends RunPod with it: ``gpu.minCudaVersion`` on create, ``minCudaVersion`` on the catalog read."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpod.errors import ConfigError
from llmpod.pod import PodConfig, main
from llmpod.pod.catalog import builtin_catalog
from llmpod.pod.cli import build_session, parse_args
from llmpod.pod.config import pod_config_from_dict
from llmpod.pod.images import KNOWN_TAGS, cuda_floor, image_cuda_floor
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import CreatePodRequest, Pod, PodSpec, RunPodClient, RunPodProvider

CATALOG = builtin_catalog()


# ----------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize(
    ("image", "floor"),
    [
        ("vllm/vllm-openai:v0.8.5", "12.4"),  # torch 2.6.0 (cu124)
        ("vllm/vllm-openai:v0.9.2", "12.8"),  # the wheel's nvcc: 12.8
        ("vllm/vllm-openai:v0.12.0", "12.9"),
        ("vllm/vllm-openai:v0.19.1", "12.9"),  # the last libcudart.so.12 release
        ("vllm/vllm-openai:v0.20.0", "13.0"),  # the first libcudart.so.13 one: before v0.27, which issue 14 named
        ("vllm/vllm-openai:v0.26.0", "13.0"),
        ("vllm/vllm-openai:v0.33.0", "13.0"),  # the shipped default
        ("vllm/vllm-openai:v0.34.0", "13.0"),
        ("docker.io/vllm/vllm-openai:v0.33.0", "13.0"),
        ("vllm/vllm-openai:v0.21.0-cu129", "12.9"),  # the same release built against CUDA 12.9
    ],
)
def test_known_tags_have_their_floor(image: str, floor: str) -> None:
    assert image_cuda_floor(image) == floor


@pytest.mark.parametrize(
    "image",
    [
        "vllm/vllm-openai:v0.10.1.1",  # 0.10/0.11: which CUDA their images got is not established
        "vllm/vllm-openai:v0.11.0",
        "vllm/vllm-openai:v0.35.0",  # newer than the table: it may have moved on
        "vllm/vllm-openai:v0.7.3",
        "vllm/vllm-openai:latest",
        "vllm/vllm-openai:nightly",
        "vllm/vllm-openai:cu130-nightly",
        "vllm/vllm-openai@sha256:" + "a" * 64,
        "vllm/vllm-openai:0.33.0",  # vLLM's tags carry the v
        "ghcr.io/acme/vllm-openai:v0.33.0",
        "registry.example.com:5000/vllm/vllm-openai:v0.26.0",
        "runpod/worker-v1-vllm:v2.7.0",
    ],
)
def test_other_tags_are_unknown(image: str) -> None:
    assert image_cuda_floor(image) is None


def test_the_table_spans_v0_8_to_v0_34_without_0_10_and_0_11() -> None:
    assert KNOWN_TAGS["v0.8.0"] == "12.4" and KNOWN_TAGS["v0.34.0"] == "13.0"
    assert not [tag for tag in KNOWN_TAGS if tag.startswith(("v0.10.", "v0.11."))]
    assert set(KNOWN_TAGS.values()) == {"12.4", "12.8", "12.9", "13.0"}


# ------------------------------------------------------------------------------------- min_cuda_version
def test_the_key_overrides_the_image_and_states_an_unknown_ones_floor() -> None:
    assert cuda_floor("vllm/vllm-openai:v0.33.0", None) == "13.0"
    assert cuda_floor("vllm/vllm-openai:v0.33.0", "12.8") == "12.8"  # the user's word wins
    assert cuda_floor("ghcr.io/acme/vllm:dev", "12.9") == "12.9"
    with pytest.raises(ConfigError) as caught:
        cuda_floor("ghcr.io/acme/vllm:dev", None, "/x/pod_config.json")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("/x/pod_config.json: min_cuda_version is null")
    assert "'ghcr.io/acme/vllm:dev'" in message and caught.value.exit_code == 2


def test_the_shipped_config_derives_the_floor_from_the_image() -> None:
    shipped = json.loads((Path(__file__).resolve().parents[2] / "pod_config.json").read_text())
    assert shipped["min_cuda_version"] is None
    assert pod_config_from_dict(shipped).min_cuda_version is None and PodConfig().min_cuda_version is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("13", "min_cuda_version='13' must be a CUDA version as major.minor, e.g. \"12.9\""),
        ("v12.9", "min_cuda_version='v12.9' must be a CUDA version"),
        ("12.9.1", "min_cuda_version='12.9.1' must be a CUDA version"),
        (13.0, "min_cuda_version=13.0 is not a string or null"),
    ],
)
def test_a_malformed_min_cuda_version_is_refused(value: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=r"^pod_config\.json: ") as caught:
        pod_config_from_dict({"min_cuda_version": value})
    assert says in str(caught.value)


def test_an_unknown_image_without_the_key_exits_2_before_any_network_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a network call was made")

    monkeypatch.setattr(httpx.Client, "send", no_network)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main() would leave its SIGTERM handler in pytest
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_test_key_never_sent")
    config = tmp_path / "pod_config.json"
    config.write_text(json.dumps({"image": "ghcr.io/acme/vllm:dev"}))
    for command in ([], ["--refresh-catalog"]):
        assert main(["--config", str(config), *command]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "min_cuda_version is null" in err and str(config) in err
    # with the key stated, the same config goes on to RunPod (here: the network we refused)
    config.write_text(json.dumps({"image": "ghcr.io/acme/vllm:dev", "min_cuda_version": "12.9"}))
    with pytest.raises(AssertionError, match="a network call was made"):
        main(["--config", str(config)])


def test_local_runs_need_no_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --local runs no image (--shutdown and --status are in tests/pod/test_cuda_floor_e2e.py)
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    config = tmp_path / "pod_config.json"
    config.write_text(json.dumps({"image": "ghcr.io/acme/vllm:dev"}))
    session = build_session(parse_args(["--config", str(config), "--local"]), Reporter())
    session.provider.close()
    assert session.provider.kind == "local"


# --------------------------------------------------------------------------------------- what is sent
class _Client:
    """Stands in for RunPodClient.create_pod: keeps the request."""

    def __init__(self) -> None:
        self.requests: list[CreatePodRequest] = []

    def create_pod(self, request: CreatePodRequest) -> Pod:
        self.requests.append(request)
        raise _Sent


class _Sent(Exception):
    pass


@pytest.mark.parametrize(
    ("overrides", "sent"),
    [
        ({}, "13.0"),
        ({"image": "vllm/vllm-openai:v0.19.1"}, "12.9"),
        ({"image": "ghcr.io/acme/vllm:dev", "min_cuda_version": "12.8"}, "12.8"),
        ({"min_cuda_version": "13.1"}, "13.1"),
    ],
)
def test_the_create_sends_the_floor(overrides: dict[str, Any], sent: str) -> None:
    config = pod_config_from_dict(overrides)
    client = _Client()
    provider = RunPodProvider(client, config, "https://{pod_id}-{port}.example")  # type: ignore[arg-type]
    model = CATALOG.model(config.modelStoreId)
    with pytest.raises(_Sent):
        provider.create(PodSpec("llmpod-0123abcd", CATALOG.gpu(config.gpu_type_id), model, model.id, 8192, "k"))
    [request] = client.requests
    assert request.gpu is not None and request.gpu.minCudaVersion == sent
    assert request.model_dump(exclude_none=True)["gpu"] == {
        "id": config.gpu_type_id,
        "count": 1,
        "minCudaVersion": sent,
    }


def test_the_catalog_read_sends_the_floor() -> None:
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={"gpus": []})

    with RunPodClient("rpa_key", "https://rest.example", transport=httpx.MockTransport(answer)) as client:
        client.gpu_types("SECURE", min_cuda_version="13.0")
        client.gpu_types("SECURE")
        client.gpu_types(availability=False, min_cuda_version="13.0")  # valid only with include=AVAILABILITY
    assert [url.query for url in seen] == [
        b"include=AVAILABILITY&product=POD&cloud=SECURE&minCudaVersion=13.0",
        b"include=AVAILABILITY&product=POD&cloud=SECURE",
        b"",
    ]
