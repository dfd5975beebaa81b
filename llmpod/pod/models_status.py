"""``manage_pod.py --status`` with ``llmModels`` (issue 18): every model's state, uptime, restarts, $/h (a RunPod
model's pod rate, and what it has cost since it was made), requests and hit rate (the proxy's per-model figures),
and the account's ``llmpod-*`` pods that no record names."""

from __future__ import annotations

import json
import time
from typing import Any

from llmpod.pod.models_config import ModelSpec
from llmpod.pod.models_rig import Rig
from llmpod.pod.output import clock
from llmpod.pod.supervisor import ModelRecord, load_models_state

__all__ = ["status"]


def _shown_state(spec: ModelSpec, record: ModelRecord | None, live: bool, figures: dict[str, Any]) -> str:
    if record is None:
        return "not started"
    if spec.kind == "external" and isinstance(figures.get("state"), str):
        return str(figures["state"])  # an external server is the proxy's to judge: its view when it gives one
    return record.state if live else "down"


def _pod_figures(r: Rig, spec: ModelSpec) -> dict[str, Any]:
    """A RunPod model's pod: its id, rate, spend since made, expiry (nothing when it has none now)."""
    if spec.kind != "runpod":
        return {}
    state = r.pods.pod_state(spec.id)
    if state is None or state.pod_id is None:
        return {"pod_id": None}
    rate = state.cost_per_hour or 0.0
    return {
        "pod_id": state.pod_id,
        "pod_phase": state.phase,
        "gpu": state.gpu_type_id,
        "spend_usd": round(rate * max(0.0, time.time() - state.created_at) / 3600, 4),
        "expires_at": state.expires_at,
        "cost_per_hour": rate,
    }


def status(r: Rig, as_json: bool) -> int:
    state = load_models_state(r.paths)
    if r.pods.sessions:
        r.pods.report_leaks(state.models if state else {})
    metrics = r.sidecars.proxy_metrics() if state else None
    per_model = (metrics or {}).get("models") if isinstance((metrics or {}).get("models"), dict) else {}
    now = time.time()
    rows: list[dict[str, Any]] = []
    for spec in r.specs:
        record = state.models.get(spec.id) if state else None
        live = record is not None and (
            record.kind != "local" or record.stopped or record.state == "down" or r.ops.alive(record)
        )
        figures = per_model.get(spec.id) if isinstance(per_model, dict) else None
        figures = figures if isinstance(figures, dict) else {}
        shown = _shown_state(spec, record, live, figures)
        rows.append(
            {
                "id": spec.id,
                "kind": spec.kind,
                "base_url": spec.base_url or (record.base_url if record else None),
                "state": shown,
                "uptime_seconds": round(now - record.since) if record and shown == "healthy" else None,
                "restarts": len(record.restart_times) if record else 0,
                "cost_per_hour": 0.0,
                "last_error": record.last_error if record else None,
                "requests": figures.get("requests"),
                "hit_rate": figures.get("cache_hit_rate", figures.get("hit_rate")),
                **_pod_figures(r, spec),
            }
        )
    report = {
        "proxy": f"http://127.0.0.1:{r.config.proxy_port}/v1" if state else None,
        "cost_per_hour": round(sum(row["cost_per_hour"] for row in rows), 4),
        "models": rows,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"proxy: {report['proxy'] or 'not running'}")
    for row in rows:
        extra = [f"up {row['uptime_seconds']}s" if row["uptime_seconds"] is not None else None]
        extra += [f"restarts {row['restarts']}", f"${row['cost_per_hour']:.2f}/h"]
        if row.get("pod_id"):
            extra.append(f"pod {row['pod_id']}, ${row['spend_usd']:.2f} so far, expires {clock(row['expires_at'])}")
        if row["requests"] is not None:
            extra.append(f"requests {row['requests']}")
        if isinstance(row["hit_rate"], int | float):
            extra.append(f"hit rate {row['hit_rate']:.0%}")
        if row["last_error"]:
            extra.append(f"last error: {row['last_error']}")
        print(f"  {row['id']}: {row['state']} ({', '.join(e for e in extra if e)})")
    if report["cost_per_hour"]:
        print(f"total: ${report['cost_per_hour']:.2f}/h")
    return 0
