"""The session's two local processes: the caching proxy and the watchdog.

Each is found by its pid file (trusted only while that pid runs a command line with the right marker, carries
this directory's owner mark in its environment and started before the file was written) or, when
a run was killed before it wrote the pid file, by the directory it carries in its environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llmpod.errors import ConfigError, PodError
from llmpod.pod import processes
from llmpod.pod.catalog import Catalog
from llmpod.pod.config import PodConfig, check_port_free
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import upstream_kind, upstream_tool_calling
from llmpod.pod.state import PodState, RuntimePaths
from llmpod.proxy_settings import ENV_NAMES, ProxySettings, proxy_stop_grace

PROXY_MARKER = "llmpod.proxy"  # in its command line: python -m llmpod.proxy
WATCHDOG_MARKER = "--watchdog"
# Every helper carries its directory in its environment, so one started by a run killed before it wrote the
# pid file is still found (and stopped) by the next run instead of outliving --shutdown.
PROXY_OF = "LLMPOD_PROXY_OF"
WATCHDOG_OF = "LLMPOD_WATCHDOG_OF"
# ours to set, never inherited from the shell
DECIDED_SETTINGS = ("UPSTREAM_TOOL_CALLING", "TOOL_CAPABLE_MODELS", "UPSTREAM_KIND")


@dataclass
class Sidecars:
    config: PodConfig
    config_path: Path
    paths: RuntimePaths
    reporter: Reporter
    catalog: Catalog | None = None  # tells the proxy which models call tools

    def owner(self, kind: str) -> tuple[str, str]:
        """The environment mark (PROXY_OF or WATCHDOG_OF, with this directory) that makes a helper ours."""
        return kind, str(self.paths.root)

    def proxy_pid(self) -> int | None:
        return processes.running(self.paths.proxy_pid, PROXY_MARKER, self.owner(PROXY_OF))

    def proxy_url(self, state: PodState | None = None) -> str:
        return f"http://127.0.0.1:{state.proxy_port if state else self.config.proxy_port}"

    def proxy_health(self, state: PodState | None = None) -> dict[str, Any] | None:
        return self._proxy_json("/health", state)

    def proxy_metrics(self, state: PodState | None = None) -> dict[str, Any] | None:
        headers = {"Authorization": f"Bearer {os.environ['PROXY_API_KEY']}"} if os.environ.get("PROXY_API_KEY") else {}
        return self._proxy_json("/metrics", state, headers)

    def _proxy_json(
        self, route: str, state: PodState | None, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        """The proxy's JSON answer on ``route``; None when it does not answer 200 with JSON."""
        try:
            response = httpx.get(f"{self.proxy_url(state)}{route}", headers=headers, timeout=3.0)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def ensure_proxy(self, state: PodState) -> None:
        pid = self.proxy_pid()
        health = self.proxy_health(state) if pid else None
        if pid and health and health.get("endpoint") == state.upstream_url:
            return
        if pid:
            stop_proxy(self.paths.proxy_pid, self.owner(PROXY_OF))
        self._stop_strays(PROXY_OF)
        check_port_free(state.proxy_port)
        assert state.upstream_url is not None
        env = self.proxy_env(state)
        processes.spawn_detached(
            processes.python_module(PROXY_MARKER), env=env, log_path=self.paths.proxy_log, pid_path=self.paths.proxy_pid
        )
        processes.checkpoint("proxy starting")
        deadline = time.monotonic() + 20
        while self.proxy_health(state) is None or self.proxy_pid() is None:  # and it must be the one we started
            if time.monotonic() > deadline or self.proxy_pid() is None:
                raise PodError(f"the proxy did not start on port {state.proxy_port}; see {self.paths.proxy_log}")
            time.sleep(0.1)

    def proxy_env(self, state: PodState) -> dict[str, str]:
        """The proxy process's environment for one pod (``proxy_environment``)."""
        assert state.upstream_url is not None
        return proxy_environment(
            self.config,
            self.paths.root,
            self.tool_env(state),
            upstream_url=state.upstream_url,
            upstream_api_key=state.vllm_api_key,
            # the kind its cache keys name, so the mock's answers never stand in for a pod's (a local command of
            # the user's: unset, the proxy learns it from the server)
            upstream_kind=upstream_kind(state.provider, self.config),
            port=state.proxy_port,
            cost_per_hour=state.cost_per_hour or 0.0,  # what a hit saved in dollars; --local's is 0
        )

    def tool_env(self, state: PodState) -> dict[str, str]:
        """The proxy's UPSTREAM_TOOL_CALLING (does the pod call tools?) and TOOL_CAPABLE_MODELS (which catalog
        models can), from the catalog entry of the model the pod serves; nothing when that is unknown."""
        if self.catalog is None:
            return {}
        try:
            model = self.catalog.model(state.model_id)
        except ConfigError:
            return {}
        env = {"TOOL_CAPABLE_MODELS": ",".join(entry.id for entry in self.catalog.models if entry.tool_calling)}
        serving = upstream_tool_calling(model, self.config)
        if serving is not None:
            env["UPSTREAM_TOOL_CALLING"] = "1" if serving else "0"
        return env

    def ensure_watchdog(self) -> None:
        if processes.running(self.paths.watchdog_pid, WATCHDOG_MARKER, self.owner(WATCHDOG_OF)):
            return
        self._stop_strays(WATCHDOG_OF)
        argv = [*processes.python_module("llmpod.pod"), WATCHDOG_MARKER, "--config", str(self.config_path)]
        # it terminates pods (RUNPOD_API_KEY) and reads and restarts the proxy (PROXY_API_KEY); it creates nothing,
        # so it never needs the Hugging Face token
        inherited = processes.child_env(
            {k: v for k, v in os.environ.items() if k != processes.HOLD_AT},
            keep=("RUNPOD_API_KEY", "PROXY_API_KEY"),
            secrets=(self.config.hf_token_env,),
        )
        env = {**inherited, WATCHDOG_OF: str(self.paths.root)}
        processes.spawn_detached(
            argv, env=env, log_path=self.paths.watchdog_log, pid_path=self.paths.watchdog_pid, cwd=self.paths.root
        )

    def stop(self, keep_watchdog: bool = False) -> None:
        if not keep_watchdog:
            if not processes.stop_pidfile(self.paths.watchdog_pid, WATCHDOG_MARKER, owner=self.owner(WATCHDOG_OF)):
                self.reporter.say("warning: the watchdog did not exit")
            self._stop_strays(WATCHDOG_OF)
        if not stop_proxy(self.paths.proxy_pid, self.owner(PROXY_OF)):
            self.reporter.say("warning: the proxy did not exit")
        self._stop_strays(PROXY_OF)

    def _stop_strays(self, marker: str) -> None:
        """Stop this directory's helpers of one kind that no pid file names (never this process)."""
        for pid in processes.find_by_environ(marker, str(self.paths.root)):
            grace = _proxy_grace(pid) if marker == PROXY_OF else 5.0
            if pid != os.getpid() and not processes.stop(pid, grace=grace):
                self.reporter.say(f"warning: process {pid} ({marker}) did not exit; kill it with `kill -9 {pid}`")


def stop_proxy(pid_path: Path, owner: tuple[str, str]) -> bool:
    """Stop the proxy ``pid_path`` names (if ours: ``processes.running``), killing it only once it has had its drain:
    on SIGTERM it lets requests in flight finish for its PROXY_DRAIN_SECONDS, then ends the rest and flushes."""
    pid = processes.running(pid_path, PROXY_MARKER, owner)
    grace = _proxy_grace(pid) if pid is not None else 0.0
    return processes.stop_pidfile(pid_path, PROXY_MARKER, grace=grace, owner=owner)


def _proxy_grace(pid: int) -> float:
    # the running proxy's own value (its environment), not this shell's: the two may differ
    return proxy_stop_grace(processes.environ_value(pid, ENV_NAMES["drain_seconds"]))


def proxy_environment(config: PodConfig, root: Path, extra: Mapping[str, str], **decided: Any) -> dict[str, str]:
    """The proxy process's environment, built by ``ProxySettings`` and so validated before it starts (a bad value
    is a one-line ``ConfigError`` here): the one place the pod manager hands the proxy its settings, for one pod
    and for several models (``decided``: upstream, port, backends…). What the pod manager does not decide
    (PROXY_API_KEY, UPSTREAM_TIMEOUT, MAX_BODY_BYTES) comes from the user's environment, as for a proxy started by
    hand; what it does decide (DECIDED_SETTINGS) never does."""
    # the watchdog restarts proxies too: its marker is not the proxy's
    inherited = {k: v for k, v in os.environ.items() if k not in (WATCHDOG_OF, processes.HOLD_AT, *DECIDED_SETTINGS)}
    settings = ProxySettings.from_env(
        {**inherited, **extra},
        host="127.0.0.1",
        cache_dir=config.cache_dir,
        max_cache_entries=config.max_cache_size,
        max_cache_bytes=config.max_cache_bytes,
        enable_profiling=config.enable_profiling,
        # pod_config.json's rules, when it has any, else the shell's CACHE_KEY_RULES(_OFF) as for a proxy by hand
        key_rules=tuple(config.cache_key_rules) or None,
        key_rules_off=tuple(config.cache_key_rules_off) or None,
        log_file="",  # stderr only: spawn_detached sends it to proxy.log
        **decided,
    )
    # the proxy's secrets are its settings' (its upstream keys and PROXY_API_KEY): no other is passed on
    own = processes.child_env(inherited, secrets=(config.hf_token_env,))
    return {**own, **settings.to_env(), PROXY_OF: str(root)}
