"""The crash-loop detector on vLLM 0.33.0's own start-up logs (tests/fixtures/vllm_logs/, one container life each).

A verdict needs a restart seen (uptime back to zero, a second start in one log window, a start after a fatal line)
and a line that explains it; the line shown is the most specific cause, never a secret.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpod.pod.crashloop import RESTARTS_ALONE, CrashLoopDetector, best_line
from tests.fakes import fake_runpod_pods as fake_pods

LOGS = Path(__file__).parents[1] / "fixtures" / "vllm_logs"
TRACEBACK = "Traceback (most recent call last)"


def cycle(name: str) -> list[str]:
    return (LOGS / f"{name}.log").read_text().splitlines()


# (fixture, kind, what the shown line says) -- the specific cause, not vLLM's summary nor the traceback's end
CAUSES = [
    (
        "cuda_driver_too_old",
        "driver",
        "UserWarning: CUDA initialization: The NVIDIA driver on your system is too old (found version 12040)",
    ),
    ("cuda_oom", "memory", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 270.00 MiB."),
    ("kv_cache_too_small", "memory", "KV cache is needed, which is larger than the available KV cache memory"),
    (
        "gated_model_no_token",
        "gated",
        "Access to model meta-llama/Llama-3.1-8B-Instruct is restricted. You must "
        "have access to it and be authenticated to access it.",
    ),
    ("disk_full", "disk", "Not enough free disk space to download the file."),
    ("bad_flag", "flag", "vllm: error: unrecognized arguments: --enable-turbo-mode"),
]


@pytest.mark.parametrize(("name", "kind", "says"), CAUSES, ids=[c[0] for c in CAUSES])
def test_two_lives_of_a_failing_container_in_one_log_window_are_a_crash_loop(name: str, kind: str, says: str) -> None:
    detector = CrashLoopDetector()
    detector.window(cycle(name) + cycle(name))
    verdict = detector.verdict()
    assert verdict is not None and verdict.kind == kind and verdict.restarts == 1
    assert says in verdict.line
    assert "\n" not in verdict.line and TRACEBACK not in verdict.line and len(verdict.line) <= 240


@pytest.mark.parametrize(("name", "kind", "says"), CAUSES, ids=[c[0] for c in CAUSES])
def test_one_life_is_not_enough_until_the_uptime_goes_back(name: str, kind: str, says: str) -> None:
    detector = CrashLoopDetector()
    detector.uptime(40)
    detector.window(cycle(name))
    assert detector.verdict() is None  # it died once: RunPod may yet not restart it, or the next start may work
    detector.uptime(45)
    assert detector.verdict() is None
    detector.uptime(3)  # a new container
    verdict = detector.verdict()
    assert verdict is not None and verdict.kind == kind and says in verdict.line


def test_a_restart_shown_by_runpods_exit_line_counts() -> None:
    detector = CrashLoopDetector()
    detector.window([*cycle("cuda_oom"), "Container exited with status 1"])
    verdict = detector.verdict()
    assert verdict is not None and verdict.kind == "memory"


def test_the_specific_cause_wins_over_vllms_summary_and_the_tracebacks_end() -> None:
    lines = cycle("cuda_driver_too_old")
    assert "RuntimeError: Failed to infer device type" in "\n".join(lines)  # the generic line is there too
    assert best_line(lines) is not None and "driver on your system is too old" in str(best_line(lines))
    gated = best_line(cycle("gated_model_no_token"))
    assert gated is not None and gated.startswith("Access to model")  # not "ValueError: Invalid repository ID"
    oom = best_line(cycle("cuda_oom"))
    assert oom is not None and "Engine core initialization failed" not in oom


def test_a_healthy_slow_model_load_gets_no_verdict() -> None:
    detector = CrashLoopDetector()
    head = cycle("healthy_slow_load")
    shards = [line for line in head if line.startswith("Loading safetensors checkpoint shards")]
    log = list(head)
    for second in range(0, 1500, 5):  # 25 minutes of polls: the log grows, the uptime only grows
        log += [
            f"(EngineCore pid=230) INFO 05-14 10:{10 + second // 60:02d}:{second % 60:02d} "
            "[weight_utils.py:1079] Prefetching checkpoint files: 40% (6/16)",
            shards[second // 5 % len(shards)],
        ]
        detector.uptime(second)
        detector.window(log[-200:])
        assert detector.verdict() is None
    assert detector.explanation() is None  # and nothing in it reads as a cause


def test_a_single_warning_gets_no_verdict_even_across_a_restart() -> None:
    detector = CrashLoopDetector()
    warning = (
        "(EngineCore pid=230) WARNING 05-14 10:03:11 [triton_decode_attention.py:46] The following error "
        "message 'operation scheduled before its operands' can be ignored."
    )
    detector.uptime(30)
    detector.window([*cycle("healthy_slow_load"), warning])
    assert detector.verdict() is None
    detector.uptime(2)  # whatever restarted it, nothing in the log says it crashes
    assert detector.verdict() is None


def test_the_driver_warning_alone_is_no_verdict_while_the_container_lives() -> None:
    detector = CrashLoopDetector()
    warning = next(line for line in cycle("cuda_driver_too_old") if "UserWarning" in line)
    for uptime in (5, 10, 20, 40):
        detector.uptime(uptime)
        detector.window([*cycle("healthy_slow_load")[:12], warning])
    assert detector.verdict() is None


def test_an_uptime_a_second_behind_is_no_restart() -> None:
    detector = CrashLoopDetector()
    for uptime in (600, 599, 605, 604):  # one sample a second behind the last: clocks, not a new container
        detector.uptime(uptime)
        detector.window(cycle("cuda_oom")[:-1])  # a fatal line in the log, one life only
    assert detector.restarts == 0 and detector.verdict() is None
    detector.uptime(2)
    assert detector.restarts == 1 and detector.verdict() is not None


def test_restarts_alone_are_a_verdict_only_when_repeated() -> None:
    detector = CrashLoopDetector()
    quiet = cycle("healthy_slow_load")[:12]
    for restart in range(1, RESTARTS_ALONE + 1):
        for uptime in (10, 20):
            detector.uptime(uptime)
            detector.window(quiet)
        detector.uptime(1)  # a new container, and again nothing in the log says why
        verdict = detector.verdict()
        assert (verdict is None) == (restart < RESTARTS_ALONE)
    assert verdict is not None and verdict.kind == "restarts" and f"restarted {RESTARTS_ALONE} times" in verdict.line


def test_a_token_the_hub_refuses() -> None:
    lines = [
        "Traceback (most recent call last):",
        "huggingface_hub.errors.HfHubHTTPError: 401 Client Error: Unauthorized for url: "
        "https://huggingface.co/api/models/Qwen/Qwen3-8B (Request ID: Root=1-6824a0c1-1b2c)",
        "",
        "Invalid credentials in Authorization header",
    ]
    detector = CrashLoopDetector()
    detector.window(cycle("healthy_slow_load")[:8] + lines + cycle("healthy_slow_load")[:8] + lines)
    verdict = detector.verdict()
    assert verdict is not None and verdict.kind == "token"
    assert verdict.line == "Invalid credentials in Authorization header"


def test_a_lone_traceback_header_is_not_shown_as_it_is() -> None:
    detector = CrashLoopDetector()
    detector.window(
        [
            "(APIServer pid=1) INFO 05-14 10:00:03 [api_server.py:1839] vLLM API server version 0.33.0",
            "Traceback (most recent call last):",
            '  File "/usr/local/bin/vllm", line 10, in <module>',
            "(APIServer pid=1) INFO 05-14 10:00:43 [api_server.py:1839] vLLM API server version 0.33.0",
        ]
    )
    verdict = detector.verdict()
    assert verdict is not None and TRACEBACK not in verdict.line and "--logs" in verdict.line


def test_secrets_never_reach_the_shown_line() -> None:
    vllm_key = "Zq3v-pod-key-0123456789abcdefXYZ"
    leaky = (
        f"(APIServer pid=1) ERROR 05-14 10:00:04 [server.py:12] fatal: startup failed for api_key={vllm_key} "
        "with HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrSt and Authorization: Bearer sk-live-abcdef0123456789 "
        f"from rpa_ABCDEF0123456789XYZ key {vllm_key}"
    )
    detector = CrashLoopDetector(secrets=[vllm_key])
    detector.window(
        [
            leaky,
            "(APIServer pid=1) INFO 05-14 10:00:03 [startup.py:18] vLLM server version 0.33.0, "
            "serving model Qwen/Qwen3-8B",
            leaky,
        ]
    )
    verdict = detector.verdict()
    assert verdict is not None and "startup failed" in verdict.line
    for secret in (vllm_key, "hf_AbCdEfGhIjKlMnOpQrSt", "sk-live-abcdef0123456789", "rpa_ABCDEF0123456789"):
        assert secret not in verdict.line
    assert verdict.line.count("***") >= 4


def test_the_fake_runpods_crash_loop_is_recognised() -> None:
    """The fake RunPod's CUDA-mismatch loop (tests/fakes/fake_runpod_pods.py) reads as the detector expects real
    logs to."""
    body = {
        "name": "llmpod-x",
        "image": "vllm/vllm-openai:v0.33.0",
        "gpu": {"id": "NVIDIA RTX A6000", "count": 1},
        "args": "--model Qwen/Qwen3-8B",
        "ports": ["8000/http"],
    }
    pod = fake_pods.FakePod(
        fake_pods.parse_create(body), fake_pods.GPUS["NVIDIA RTX A6000"], "US-KS-2", "12.4", 0.0, 0.0, 0.0
    )
    cases = (({}, "unsatisfied condition: cuda>=13.0"), ({"NVIDIA_DISABLE_REQUIRE": "1"}, "found version 12040"))
    for env, says in cases:
        pod.crash = fake_pods.driver_too_old("12.4", body["image"], env)  # type: ignore[arg-type]
        detector = CrashLoopDetector()
        for second in (0.5, 1.0, 1.5, 2.5):
            now = pod.running_at + second
            runtime = pod.view(now)["runtime"]
            detector.uptime(runtime["uptime"] if runtime else None)
            detector.window([line["line"] for line in pod.logs(now)][-200:])
        verdict = detector.verdict()
        assert verdict is not None and verdict.kind == "driver" and says in verdict.line


def test_the_container_runtime_refusing_an_image_for_a_newer_cuda_is_a_verdict_at_once() -> None:
    """Where the host's driver is older than an nvidia/cuda-based image asks (NVIDIA_REQUIRE_CUDA), the NVIDIA
    runtime refuses to create the container: no vLLM line ever appears, and no restart will help on this host.
    The wording is the runtime's own (vllm-project/vllm#18813, NVIDIA/nvidia-container-toolkit#152)."""
    refused = (
        "Error response from daemon: failed to create task for container: failed to create shim task: OCI runtime "
        "create failed: runc create failed: unable to start container process: error during container init: error "
        "running prestart hook #0: exit status 1, stdout: , stderr: Auto-detected mode as 'legacy'",
        "nvidia-container-cli: requirement error: unsatisfied condition: cuda>=13.0, please update your driver to a "
        "newer version, or use an earlier cuda container: unknown",
    )
    detector = CrashLoopDetector()
    detector.uptime(None)
    detector.window(list(refused))
    verdict = detector.verdict()
    assert verdict is not None and verdict.kind == "driver"
    assert verdict.line.startswith("nvidia-container-cli: requirement error: unsatisfied condition: cuda>=13.0")
