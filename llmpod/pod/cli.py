"""``manage_pod.py``: argument parsing, and the one place where our errors become messages and exit codes.

Exit codes: 0 done; 1 a pod or RunPod problem; 2 bad configuration or RunPod key (nothing was created);
3 another manage_pod.py holds the lock; 4 a pod could not be confirmed terminated (it may be billing);
130 interrupted (any pod being created was terminated first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import httpx

from llmpod.errors import ConfigError, ForeignPodError, LlmpodError
from llmpod.pod import multi
from llmpod.pod import output as report
from llmpod.pod.catalog import (
    Catalog,
    load_catalog,
)
from llmpod.pod.catalog_refresh import DEFAULT_HF_API_BASE, refresh_catalog
from llmpod.pod.config import PodConfig, load_pod_config
from llmpod.pod.images import cuda_floor
from llmpod.pod.lifecycle import Session
from llmpod.pod.preflight import check_config, make_provider
from llmpod.pod.progress import Reporter
from llmpod.pod.providers import (
    RunPodProvider,
)
from llmpod.pod.state import RuntimePaths, clear_state, discard_damaged_state, load_state

DESCRIPTION = """Start, watch and stop a vLLM pod on RunPod, with a caching OpenAI proxy on localhost.

  python3 manage_pod.py            create (or reuse) the pod, start the proxy, print the endpoint
  python3 manage_pod.py --local    the same with a local mock vLLM process: no account, no GPU
  python3 manage_pod.py --status   what runs, what it costs, when it stops
  python3 manage_pod.py --shutdown terminate the pod and stop everything (the cache is kept)

With llmModels in the config (several models behind the proxy, docs/settings.md), the plain run starts them all,
and --start ID, --stop ID, --restart ID act on one of them while the others keep serving.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="manage_pod.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("pod_config.json"),
        help="pod configuration file (default ./pod_config.json); state files live beside it",
    )
    parser.add_argument("--local", action="store_true", help="run a local process instead of a RunPod pod")
    parser.add_argument("--verbose", "-v", action="store_true", help="more detail (status, catalog figures)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", action="store_true", help="show the pod, its cost and the proxy")
    action.add_argument("--shutdown", action="store_true", help="terminate the pod, stop the proxy and watchdog")
    action.add_argument("--refresh-catalog", action="store_true", help="update the GPU and model catalog")
    action.add_argument("--extend", type=int, metavar="SECONDS", help="push the pod's expiry back")
    action.add_argument("--logs", action="store_true", help="follow the pod's log")
    action.add_argument("--watchdog", action="store_true", help=argparse.SUPPRESS)
    # several models (llmModels): one model at a time, while the others keep serving
    action.add_argument("--start", metavar="ID", help="with llmModels: start one model")
    action.add_argument("--stop", metavar="ID", help="with llmModels: stop one model (not restarted)")
    action.add_argument("--restart", metavar="ID", help="with llmModels: restart one model")
    parser.add_argument("--all", action="store_true", help="with --shutdown: every pod named llmpod-*")
    parser.add_argument("--json", action="store_true", help="with --status: machine-readable output")
    args = parser.parse_args(argv)
    if args.all and not args.shutdown:
        parser.error("--all goes with --shutdown")
    if args.extend is not None and args.extend <= 0:
        parser.error("--extend takes a positive number of seconds")
    return args


def build_session(args: argparse.Namespace, reporter: Reporter) -> Session:
    config_path = args.config.resolve()
    # --local works in an empty directory: the defaults run the mock vLLM server
    config = load_pod_config(config_path) if config_path.exists() or not args.local else PodConfig(provider="local")
    paths = RuntimePaths(config_path.parent)
    if args.local or _recorded_provider(paths) == "local":
        # `--shutdown` or `--status` after `--local` act on the local pod without asking for --local again
        config = config.model_copy(update={"provider": "local"})
    if config.provider == "runpod" and (creates_pod(args) or args.refresh_catalog):
        cuda_floor(config.image, config.min_cuda_version, str(config_path))  # unknown: exit 2, before any network
    paths.ensure()
    catalog = load_catalog(paths.catalog)
    model, gpus = check_config(config, catalog, creates_pod(args), reporter)  # before any network call
    provider = make_provider(config, paths.pod_log)
    if not (args.watchdog or args.refresh_catalog):  # a refresh falls back to built-in data instead (README)
        provider.check_access()  # a missing or revoked key is one line and exit 2, before anything else
    if config.provider != "local" and args.verbose and catalog.gpus_source == "built-in" and not args.refresh_catalog:
        reporter.say(
            f"note: GPU catalog from {catalog.gpus_source} data "
            "(run `python3 manage_pod.py --refresh-catalog` for RunPod's prices and stock)"
        )
    return Session(
        config=config,
        config_path=config_path,
        paths=paths,
        provider=provider,
        catalog=catalog,
        model=model,
        gpus=gpus,
        reporter=reporter,
    )


def creates_pod(args: argparse.Namespace) -> bool:
    """The plain run (no action flag) is the only one that may create a pod."""
    return command_name(args) == "up"


def _recorded_provider(paths: RuntimePaths) -> str | None:
    try:
        state = load_state(paths)
    except ConfigError:
        return None  # reported where it matters
    return state.provider if state else None


def refresh(session: Session) -> Catalog:
    gpu_source = None
    if isinstance(session.provider, RunPodProvider):
        client = session.provider.client
        cloud = session.config.cloud_type
        floor = cuda_floor(session.config.image, session.config.min_cuda_version)
        # one try, then the data we have (README)
        gpu_source = lambda: client.gpu_types(cloud, min_cuda_version=floor, retries=0)  # noqa: E731
    with httpx.Client(timeout=10.0) as hub:
        catalog, notes = refresh_catalog(
            session.paths.catalog,
            gpu_source=gpu_source,
            hub=hub,
            hf_api_base=os.environ.get("HF_API_BASE") or DEFAULT_HF_API_BASE,
        )
    for note in notes:
        session.reporter.say(note)
    return catalog


def report_leaks(session: Session) -> None:
    """Every run says which of the account's llmpod-* pods this directory does not know, even when its
    state file is damaged (then all of them are listed before the error)."""
    try:
        known = load_state(session.paths)
    except ConfigError:
        session.report_leaks(None)
        raise
    session.report_leaks(known)


def stop_if_state_damaged(session: Session) -> None:
    """A damaged state file stops the command (exit 2), after listing the account's pods it may have named."""
    try:
        load_state(session.paths)
    except ConfigError:
        session.report_leaks(None)
        raise


def _nothing_to_check(args: argparse.Namespace) -> bool:
    """--shutdown/--status with nothing recorded here and no RunPod key: nothing we could act on."""
    if not (args.shutdown or args.status) or args.all or args.local or os.environ.get("RUNPOD_API_KEY", "").strip():
        return False
    paths = RuntimePaths(args.config.resolve().parent)
    return not paths.state_file.exists()


def cmd_watchdog(session: Session, args: argparse.Namespace) -> int:
    from llmpod.pod.watchdog import run_watchdog  # only the detached watchdog process needs it

    return run_watchdog(session)


def cmd_shutdown(session: Session, args: argparse.Namespace) -> int:
    if not args.all:
        report_leaks(session)
    cache = report.session_cache(session)  # the proxy's figures go with it
    try:
        result = session.shutdown(all_ours=args.all)
    except ForeignPodError:
        if not args.all:
            raise
        # --all removes every llmpod-* pod (the recorded name's among them) and forgets a record it cannot trust
        print(f"forgot {session.paths.state_file}: its pod id names a pod that is not the recorded one")
        clear_state(session.paths)
        result = session.shutdown(all_ours=True)
    print(report.shutdown_text(result, cache))
    if args.all and discard_damaged_state(session.paths):
        print(f"removed the damaged {session.paths.state_file}: every pod it could name is terminated")
    return 0


def cmd_status(session: Session, args: argparse.Namespace) -> int:
    report_leaks(session)
    data = report.status(session)
    print(json.dumps(data, indent=2) if args.json else report.status_text(data))
    return 0


def cmd_extend(session: Session, args: argparse.Namespace) -> int:
    stop_if_state_damaged(session)
    state = session.extend(args.extend)
    print(f"pod {state.pod_name} now expires {report.clock(state.expires_at)}")
    return 0


def cmd_refresh_catalog(session: Session, args: argparse.Namespace) -> int:
    print(report.catalog_text(refresh(session), args.verbose))
    return 0


def cmd_logs(session: Session, args: argparse.Namespace) -> int:
    stop_if_state_damaged(session)
    recorded, _ = session.reconcile()
    if recorded is None or recorded.pod_id is None:
        raise LlmpodError("no pod is running from this directory")
    for line in session.provider.follow_logs(recorded.pod_id):
        print(line, flush=True)
    return 0


def cmd_up(session: Session, args: argparse.Namespace) -> int:
    stop_if_state_damaged(session)
    state = session.up()
    print(report.ready_text(session, state))
    if args.verbose:
        print(report.status_text(report.status(session)))
    return 0


COMMANDS: dict[str, Callable[[Session, argparse.Namespace], int]] = {
    "watchdog": cmd_watchdog,
    "shutdown": cmd_shutdown,
    "status": cmd_status,
    "extend": cmd_extend,
    "refresh_catalog": cmd_refresh_catalog,
    "logs": cmd_logs,
    "up": cmd_up,
}


def command_name(args: argparse.Namespace) -> str:
    """The action flag given (argparse keeps them mutually exclusive), or ``up`` without one."""
    if args.extend is not None:
        return "extend"
    for name in ("start", "stop", "restart"):
        if getattr(args, name, None) is not None:
            return name
    return next(
        (name for name in ("watchdog", "shutdown", "status", "refresh_catalog", "logs") if getattr(args, name)), "up"
    )


def run(args: argparse.Namespace) -> int:
    """One command; its errors propagate to ``main``, the one place they become a message and an exit code."""
    if _nothing_to_check(args):
        print(
            "nothing was running from this directory; nothing to do (RUNPOD_API_KEY is not set, so RunPod "
            "was not checked for pods left elsewhere)"
        )
        return 0
    if multi.applies(args, command_name(args)):  # llmModels: several models, no pod of ours (llmpod.pod.multi)
        return multi.run(args, command_name(args))
    if command_name(args) in ("start", "stop", "restart"):
        raise ConfigError(f"--{command_name(args)} acts on a model of llmModels, and {args.config} has none")
    session = build_session(args, Reporter())
    try:
        return COMMANDS[command_name(args)](session, args)
    finally:
        session.provider.close()


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so a pod being created is terminated before we go, exactly as for Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.watchdog:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return run(args)
    except LlmpodError as exc:
        print(f"manage_pod.py: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("manage_pod.py: interrupted", file=sys.stderr)
        return 130
