"""What manage_pod.py prints: the ready summary, --status, --shutdown and the catalog, as data (for
``--json``) and as text for people. Everything here goes to stdout; progress goes to stderr elsewhere."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

from llmpod.errors import ConfigError
from llmpod.pod.catalog import Catalog, ModelEntry
from llmpod.pod.lifecycle import Session, ShutdownResult
from llmpod.pod.state import PodState, load_state, read_last_session


def clock(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def status(session: Session) -> dict[str, Any]:
    """The pod as RunPod (or the local process table) reports it, the session's clocks, and the proxy."""
    state = load_state(session.paths)
    if state is None:
        return {"pod": None, "last_session": read_last_session(session.paths)}
    now = time.time()
    pod = session.provider.get(state.pod_id) if state.pod_id else session.provider.find_by_name(state.pod_name)
    metrics = session.sidecars.proxy_metrics(state)
    health = session.sidecars.proxy_health(state)
    last_request = metrics.get("last_request_at") if metrics else None
    idle_since = max(filter(None, [state.ready_at, last_request])) if (state.ready_at or last_request) else None
    idle_left = (state.idle_timeout_seconds - (now - idle_since)) if state.idle_timeout_seconds and idle_since else None
    return {
        "pod": {
            "id": state.pod_id,
            "name": state.pod_name,
            "provider": state.provider,
            "phase": state.phase,
            "status": pod.status if pod else "GONE",
            "gpu": state.gpu_type_id,
            "cost_per_hour": pod.cost_per_hour if pod else 0.0,
            "uptime_seconds": now - state.created_at,
            "spend_usd": round(session.spend(state, pod), 4),
            "model": state.served_model,
            "expires_at": clock(state.expires_at),
            "expires_in_seconds": state.expires_at - now,
            "idle_shutdown_in_seconds": idle_left,
        },
        "endpoint": f"{session.sidecars.proxy_url(state)}/v1",
        "proxy": {
            "healthy": bool(health and health.get("status") == "healthy"),
            "status": health.get("status") if health else "not running",
            "cache_entries": metrics.get("cache_entries") if metrics else None,
            "cache_hit_rate": metrics.get("cache_hit_rate") if metrics else None,
            "requests_total": metrics.get("requests_total") if metrics else None,
            "last_request_at": clock(last_request),
            "cache": cache_report(metrics),
        },
    }


def cache_report(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the cache did, from the proxy's JSON /metrics: the hit rates (all-time, over its recent window and the
    last hour; overall and per client family) and what its hits saved. None when the proxy did not say."""
    if not metrics or not isinstance(metrics.get("windows"), dict):
        return None
    return {
        "cost_per_hour": metrics.get("cost_per_hour"),
        **metrics["windows"],
        "clients": metrics.get("clients") or {},
    }


def _rates(windows: dict[str, Any]) -> str:
    recent, hour, total = windows["recent"], windows["last_hour"], windows["all_time"]
    return (
        f"{total['hit_rate']:.0%} of {total['lookups']} all-time, {recent['hit_rate']:.0%} of the last "
        f"{recent['lookups']}, {hour['hit_rate']:.0%} of {hour['lookups']} in the last hour"
    )


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else _duration(seconds)


def _saved(window: dict[str, Any]) -> str:
    return (
        f"{window['tokens_saved']} tokens, {_seconds(window['generation_seconds_saved'])} of generation, "
        f"${window['usd_saved']:.2f}"
    )


def cache_lines(cache: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The hit rates, per client, and the savings as (name, value) rows; none when the proxy did not say."""
    if cache is None:
        return []
    rows = [("hit rate", _rates(cache))]
    rows += [(f"  {name}", _rates(windows)) for name, windows in cache["clients"].items()]
    rows.append(
        (
            "cache saved",
            f"{_saved(cache['all_time'])} (last hour: {_saved(cache['last_hour'])}) at "
            f"${cache['cost_per_hour'] or 0:.2f}/h",
        )
    )
    return rows


def status_text(report: dict[str, Any]) -> str:
    pod = report["pod"]
    if pod is None:
        last = report.get("last_session")
        lines = ["no pod is running from this directory"]
        if last:
            spend = last.get("spend_usd")
            lines.append(
                f"last session ended {clock(last.get('ended_at'))}: {last.get('reason')}"
                + (f" (spend ${spend:.2f})" if isinstance(spend, int | float) else "")
            )
        return "\n".join(lines)
    proxy = report["proxy"]
    rows = [
        ("pod", f"{pod['name']} ({pod['id']}) {pod['status']}"),
        ("gpu", f"{pod['gpu'] or pod['provider']} at ${pod['cost_per_hour']:.2f}/h"),
        ("model", pod["model"]),
        ("uptime", _duration(pod["uptime_seconds"])),
        ("spend so far", f"${pod['spend_usd']:.2f}"),
        ("expires", f"{pod['expires_at']} (in {_duration(pod['expires_in_seconds'])})"),
        (
            "idle shutdown",
            "off"
            if pod["idle_shutdown_in_seconds"] is None
            else f"in {_duration(pod['idle_shutdown_in_seconds'])} with no answer served",
        ),
        ("endpoint", report["endpoint"]),
        (
            "proxy",
            proxy["status"]
            + (
                f", {proxy['cache_entries']} cached answers, hit rate "
                f"{proxy['cache_hit_rate']:.0%}, {proxy['requests_total']} requests"
                if proxy["cache_entries"] is not None
                else ""
            ),
        ),
        *cache_lines(proxy.get("cache")),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# Kilo Code 7.7.7 sends max_tokens = min(limit.output, 32000) (its ProviderTransform.maxOutputTokens): an output
# limit of a quarter of the context leaves the prompt room and keeps clear of vLLM's max_tokens > max_model_len 400
KILO_OUTPUT_SHARE = 4
KILO_OUTPUT_MAX = 8192
KILO_ENV_KEY = "{env:PROXY_API_KEY}"  # Kilo substitutes the variable when it reads its global config


def kilo_config(endpoint: str, api_key: str, model: str, context: int | None, tool_call: bool) -> dict[str, Any]:
    """A ``kilo.json`` (Kilo CLI and the current extension) with llmpod as an OpenAI-compatible provider; checked
    with Kilo CLI 7.7.7's ``kilo config check`` (``limit`` needs both ``context`` and ``output``)."""
    entry: dict[str, Any] = {"name": model, "tool_call": tool_call}
    if context:
        entry["limit"] = {"context": context, "output": min(KILO_OUTPUT_MAX, context // KILO_OUTPUT_SHARE)}
    return {
        "$schema": "https://app.kilo.ai/config.json",
        "model": f"llmpod/{model}",
        "provider": {
            "llmpod": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "llmpod",
                "options": {"baseURL": endpoint, "apiKey": api_key},
                "models": {model: entry},
            }
        },
    }


def kilo_json_text(config: dict[str, Any]) -> str:
    """``config`` as JSON, one line per provider field: short enough to read in a terminal, and pasteable."""
    ((name, provider),) = config["provider"].items()
    fields = ",\n".join(f"    {json.dumps(key)}: {json.dumps(value)}" for key, value in provider.items())
    top = "".join(f"  {json.dumps(key)}: {json.dumps(value)},\n" for key, value in config.items() if key != "provider")
    return f'{{\n{top}  "provider": {{{json.dumps(name)}: {{\n{fields}\n  }}}}\n}}'


def _served_entry(session: Session, state: PodState) -> ModelEntry | None:
    if session.model.id == state.model_id:
        return session.model
    try:
        return session.catalog.model(state.model_id)
    except ConfigError:
        return None


def ready_text(session: Session, state: PodState) -> str:
    endpoint = f"{session.sidecars.proxy_url(state)}/v1"
    model = state.served_model
    entry = _served_entry(session, state)
    # the proxy strips the key the same way. The key itself is never printed (terminal scrollback, screen shares and
    # CI logs keep stdout): kilo.json refers to it, and Kilo CLI 7.7.7 resolves {env:PROXY_API_KEY} in the user's
    # global config (~/.config/kilo/kilo.json; a project's kilo.json may not read the environment)
    key_set = bool(os.environ.get("PROXY_API_KEY", "").strip())
    api_key = KILO_ENV_KEY if key_set else "none"
    legacy_key = 'your PROXY_API_KEY (echo "$PROXY_API_KEY")' if key_set else "'none'"
    context = (session.config.max_model_len or entry.context_length) if entry else None
    tools = entry is not None and entry.tool_calling
    if entry is None:
        calls = ""
    elif tools:
        calls = f"; calls tools (vLLM parser {entry.tool_call_parser}): works as an agent"
    else:
        capable = ", ".join(m.id for m in session.catalog.models if m.tool_calling)
        calls = f"; no tool calling: chat, edit and autocomplete only (agents need one of: {capable})"
    return "\n".join(
        [
            f"ready: {endpoint}",
            f"model:    {model}" + (f", {context} tokens of context" if context else "") + calls,
            "API key:  the value of PROXY_API_KEY in your environment (not shown here)"
            if key_set
            else "API key:  none set (PROXY_API_KEY): any value works",
            f"cost:     ${state.cost_per_hour or 0:.2f}/h, expires {clock(state.expires_at)}"
            + (
                f", idle shutdown after {state.idle_timeout_seconds // 60} min with no answer served"
                if state.idle_timeout_seconds
                else ""
            ),
            "Kilo Code (Kilo CLI and current extension): in ~/.config/kilo/kilo.json"
            + (" (run Kilo where PROXY_API_KEY is exported)" if key_set else " or ./kilo.json"),
            kilo_json_text(kilo_config(endpoint, api_key, model, context, tools)),
            f"Kilo Code (legacy 5.x extension): provider 'OpenAI Compatible', Base URL {endpoint}, API key "
            f"{legacy_key}, model '{model}'",
            "stop it:  python3 manage_pod.py --shutdown",
        ]
    )


def session_cache(session: Session) -> dict[str, Any] | None:
    """What the running proxy's cache did (``cache_report``), read before --shutdown stops it; None when no proxy
    answers (or the state cannot be read: the shutdown itself says why)."""
    try:
        state = load_state(session.paths)
    except ConfigError:
        return None
    return cache_report(session.sidecars.proxy_metrics(state)) if state is not None else None


def shutdown_text(result: ShutdownResult, cache: dict[str, Any] | None = None) -> str:
    if not result.terminated and not result.had_state:
        return "nothing was running; nothing to do"
    spend = result.spend_usd
    pods = ", ".join(result.terminated) or "none"
    text = f"terminated: {pods}; proxy and watchdog stopped" + (f"; session spend ${spend:.2f}" if spend else "")
    if cache is not None:
        total = cache["all_time"]
        text += (
            f"\ncache: {total['hits']} hits of {total['lookups']} lookups ({total['hit_rate']:.0%}) since the proxy "
            f"started, saved {_saved(total)}"
        )
    return text


def catalog_text(catalog: Catalog, verbose: bool) -> str:
    lines = [f"models ({catalog.models_source}):"]
    for model in catalog.models:
        lines.append(
            f"  {model.id:<40} {model.name}"
            + (
                f"  [{model.parameters_b:g}B {model.quantization or 'bf16'}, >= {model.min_gpu_memory_gb} GB, "
                f"ctx {model.context_length}, tools {model.tool_call_parser or 'none'}"
                f"{', gated' if model.gated else ''}]"
                if verbose
                else ""
            )
        )
    lines.append(f"GPUs ({catalog.gpus_source}):")
    for gpu in catalog.gpus:
        price = f"${gpu.price_secure:.2f}/h" if gpu.price_secure is not None else "price unknown"
        lines.append(
            f"  {gpu.id:<40} {gpu.memory_gb:>3} GB  {price}"
            + (f"  stock {gpu.availability}" if verbose and gpu.availability else "")
        )
    return "\n".join(lines)
