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
    figures = {"models": {"docs": {"requests": 12, "cache_hit_rate": 0.25}}}
    assert multi.status(rig(tmp_path, figures, monkeypatch), as_json=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  chat: down (restarts 2, $0.00/h, last error: killed by SIGKILL: bye)"
    assert lines[2].startswith("  docs: healthy (up 9") and lines[2].endswith("requests 12, hit rate 25%)")


def test_without_per_model_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert multi.status(rig(tmp_path, None, monkeypatch), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(m["id"], m["state"], m["restarts"], m["requests"]) for m in report["models"]] == [
        ("chat", "down", 2, None),
        ("docs", "healthy", 0, None),
    ]
