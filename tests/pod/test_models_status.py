"""``--status`` with llmModels (issue 18): every model's state, uptime, restarts, $/h, and the proxy's per-model
requests and hit rate when its /metrics has them (tolerated when it has not)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmpod.pod import multi
from llmpod.pod.supervisor import ModelRecord, ModelsState, save_models_state


def rig(tmp_path: Path, metrics: dict[str, Any] | None, monkeypatch: pytest.MonkeyPatch) -> multi.Rig:
    entry = {"command": sys.executable, "endpoints": {"base_url": "http://127.0.0.1:9/v1"}}
    config = {"llmModels": {"chat": entry, "docs": {"endpoints": {"base_url": "http://10.0.0.5:8000/v1"}}}}
    (tmp_path / "pod_config.json").write_text(json.dumps(config))
    r = multi.rig(argparse.Namespace(config=tmp_path / "pod_config.json"))
    monkeypatch.setattr(r.sidecars, "proxy_metrics", lambda state=None: metrics)
    now = time.time()
    save_models_state(
        r.paths,
        ModelsState(
            proxy_port=8000,
            created_at=now,
            models={
                "chat": ModelRecord(
                    id="chat",
                    kind="local",
                    state="down",
                    restart_times=[now - 5, now - 1],
                    last_error="killed by SIGKILL: bye",
                ),
                "docs": ModelRecord(id="docs", kind="external", state="healthy", since=now - 90),
            },
        ),
    )
    return r


def test_every_model_with_the_proxy_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = {"models": {"docs": {"requests": 12, "cache_hit_rate": 0.25, "state": "degraded"}}}
    assert multi.status(rig(tmp_path, figures, monkeypatch), as_json=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  chat: down (restarts 2, $0.00/h, last error: killed by SIGKILL: bye)"
    # an external server: the proxy's view of it
    assert lines[2].startswith("  docs: degraded (restarts 0") and lines[2].endswith("requests 12, hit rate 25%)")


def test_without_per_model_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert multi.status(rig(tmp_path, None, monkeypatch), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(m["id"], m["state"], m["restarts"], m["requests"]) for m in report["models"]] == [
        ("chat", "down", 2, None),
        ("docs", "healthy", 0, None),
    ]


def test_a_secret_in_the_last_output_line_is_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = rig(tmp_path, None, monkeypatch)
    (spec,) = [s for s in r.specs if s.id == "chat"]
    r.ops.environ["OPENAI_API_KEY"] = "sk-secret-value-123"
    from llmpod.pod.supervisor import log_file

    log_file(r.paths, "chat").write_text("starting\nerror: bad key sk-secret-value-123 refused\n")
    assert r.ops.last_line(spec) == "error: bad key *** refused"


def test_a_single_pod_record_is_not_taken_for_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmpod.pod.cli import main

    entry = {"command": sys.executable, "endpoints": {"base_url": "http://127.0.0.1:9/v1"}}
    (tmp_path / "pod_config.json").write_text(json.dumps({"llmModels": {"chat": entry}}))
    (tmp_path / "pod_state.json").write_text(json.dumps({"provider": "local", "phase": "ready"}))
    assert main(["--config", str(tmp_path / "pod_config.json")]) == 2
    assert "records a pod started without llmModels: stop it first" in capsys.readouterr().err
