"""GPU failover in ``Session._create`` against the fake RunPod (in-process), through the real RunPod client.

The spec's create table (/work/shared/reference/runpod-v2-openapi.json, ``POST /v2/pods`` description): a 403
means "Your account cannot access the requested pool. Skip this candidate, keep going." Only when no candidate
can be had does the run end, and then with nothing created or left billing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from llmpod.errors import PodError
from llmpod.pod import PodConfig, Session
from llmpod.pod.catalog import builtin_catalog, validate_config
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import RunPodClient, RunPodProvider
from llmpod.pod.state import RuntimePaths, load_state
from tests.fakes.fake_runpod import FakeRunPod, FakeRunPodSettings, create_app, pod_url_template
from tests.support.servers import LoopbackServer, free_port

KEY = "rpa_fake_key_for_the_failover_tests"
A6000, L40S = "NVIDIA RTX A6000", "NVIDIA L40S"


@pytest.fixture
def runpod() -> Iterator[tuple[LoopbackServer, FakeRunPod]]:
    app = create_app(FakeRunPodSettings(api_key=KEY, provisioning_seconds=0, starting_seconds=0, vllm_load_seconds=0))
    with LoopbackServer(app) as server:
        yield server, app.state.fake


def session(tmp_path: Path, server: LoopbackServer, model: str) -> tuple[Session, io.StringIO]:
    config = PodConfig(
        modelStoreId=model,
        gpu_type_id=A6000,
        gpu_type_ids=[L40S],
        proxy_port=free_port(),
        cache_dir=str(tmp_path / "cache"),
        ready_timeout_seconds=60,
    )
    paths = RuntimePaths(tmp_path)
    paths.ensure()
    catalog = builtin_catalog()
    chosen, gpus = validate_config(config, catalog)
    said = io.StringIO()
    provider = RunPodProvider(RunPodClient(KEY, server.url, sleep=lambda _: None), config, pod_url_template(server.url))
    reporter = Reporter(Console(file=said, width=400, highlight=False))
    return Session(
        config=config,
        config_path=tmp_path / "pod_config.json",
        paths=paths,
        provider=provider,
        catalog=catalog,
        model=chosen,
        gpus=gpus,
        reporter=reporter,
        sleep=lambda _: None,
    ), said


def live(fake: FakeRunPod) -> list[str]:
    return [pod.id for pod in fake.pods.values() if not pod.gone]


def test_a_403_on_the_first_gpu_moves_on_to_the_next(tmp_path: Path, runpod: tuple[LoopbackServer, FakeRunPod]) -> None:
    server, fake = runpod
    fake.configure({"forbidden_gpu_ids": [A6000]})
    run, said = session(tmp_path, server, "qwen3-coder-30b-a3b-instruct-fp8")
    try:
        state = run._create()
        assert state.phase == "ready" and state.gpu_type_id == L40S
        assert fake.calls["POST /v2/pods"] == 2 and live(fake) == [state.pod_id]
        text = said.getvalue()
        assert (
            f"{A6000}: RunPod answered 403, this account has no access to that GPU pool: trying the next GPU "
            "type" in text
        )
        # the A6000 was asked for first: an FP8 model there runs through vLLM's Marlin kernel, and the user is told
        assert f"note: {A6000} (compute capability 8.6, Ampere) has no FP8 hardware" in text
        assert f"note: {L40S}" not in text
    finally:
        run._terminate_recorded(load_state(run.paths) or state, "test over")
        run.provider.close()
    assert live(fake) == []


def test_no_gpu_pool_open_to_the_account_creates_nothing(
    tmp_path: Path, runpod: tuple[LoopbackServer, FakeRunPod]
) -> None:
    server, fake = runpod
    fake.configure({"forbidden_gpu_ids": [A6000, L40S]})
    run, _ = session(tmp_path, server, "deepseek-coder-33b-instruct-awq")
    with pytest.raises(PodError) as caught:
        run._create()
    run.provider.close()
    message = str(caught.value)
    assert message.startswith(f"no GPU could be had: {A6000}: RunPod POST /v2/pods: 403 Forbidden: access denied")
    assert f"{L40S}: RunPod POST /v2/pods: 403 Forbidden" in message and caught.value.exit_code == 1
    assert "\n" not in message
    assert fake.calls["POST /v2/pods"] == 2 and fake.pods == {}
    assert load_state(run.paths) is None  # the intent is cleared: nothing to remove later
