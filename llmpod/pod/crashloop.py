"""Telling a container that crash-loops from a vLLM that is slowly loading its model.

On RunPod a container whose entrypoint dies is restarted: the pod stays RUNNING and billed while vLLM never
answers (a bad flag, out of memory, a gated model or a missing HF token, a full disk, an image built for a newer
CUDA than the host's driver). While waiting for vLLM, the lifecycle feeds a ``CrashLoopDetector`` what each poll
reads: the pod's ``runtime.uptime`` ("Seconds since the container started", REST v2 ``PodRuntime``) and a tail
of its log. It decides on clear evidence only: the container was seen to restart (its uptime went back, a second
vLLM start in one log window, a start after a fatal line, or an exit line) *and* a fatal line explains it, or it
restarted ``RESTARTS_ALONE`` times. One fatal-looking line, a warning or a long quiet model load is never enough.

The wordings are vLLM 0.33.0's, PyTorch's and huggingface_hub's own (each pattern says where it comes from);
tests/fixtures/vllm_logs/ holds whole crash cycles as vLLM prints them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["RESTARTS_ALONE", "CrashLoopDetector", "Verdict", "best_line", "billed", "clean", "progress_line", "redact"]

RESTARTS_ALONE = 3  # restarts that are evidence enough without any fatal line (the container dies silently)
SHOWN = 240  # characters of the explaining line shown to the user


@dataclass(frozen=True)
class Cause:
    rank: int  # the more specific the explanation, the higher: the user is shown the highest
    kind: str
    pattern: re.Pattern[str]


def _cause(rank: int, kind: str, pattern: str) -> Cause:
    return Cause(rank, kind, re.compile(pattern))


CAUSES = (
    # The host's driver runs an older CUDA than the image's PyTorch: torch/cuda/__init__.py warns "CUDA
    # initialization: The NVIDIA driver on your system is too old (found version 12040). Please update your GPU
    # driver ..." (c10/cuda/CUDAFunctions.cpp), or raises it as a RuntimeError; "Found no NVIDIA driver on your
    # system" (torch/cuda/__init__.py); cudaErrorInsufficientDriver's text; a CUDA 13 build's missing library;
    # the NVIDIA container runtime refusing an nvidia/cuda-based image (NVIDIA_REQUIRE_CUDA) before it runs at all:
    # "nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.8, please update your driver ..."
    # (OCI runtime create failed; vllm-project/vllm#18813, NVIDIA/nvidia-container-toolkit#152).
    _cause(
        100,
        "driver",
        r"NVIDIA driver on your system is too old|Found no NVIDIA driver on your system|"
        r"CUDA driver version is insufficient for CUDA runtime version|"
        r"lib(?:cudart|cublas|cuda)\.so\.\d+: cannot open shared object file|"
        r"nvidia-container-cli: requirement error: unsatisfied condition: cuda",
    ),
    # Out of GPU memory: PyTorch's allocator (c10/cuda/CUDACachingAllocator.cpp "CUDA out of memory. Tried to
    # allocate ..."), vLLM 0.33 vllm/v1/core/kv_cache_planning.py:58 and :77 (no room for the KV cache, or not
    # for one request of max_model_len), vllm/v1/worker/utils.py:766 (free memory under gpu_memory_utilization).
    _cause(
        90,
        "memory",
        r"CUDA out of memory|OutOfMemoryError|No available memory for the cache blocks|"
        r"KV cache is needed, which is larger than the available KV cache memory|"
        r"is less than desired GPU memory utilization",
    ),
    # A gated model: the Hub's own X-Error-Message ("Access to model X is restricted. You must have access to it
    # and be authenticated to access it. Please log in." without a token; "... and you are not in the authorized
    # list" with one, huggingface_hub errors.py:359), after huggingface_hub utils/_http.py:890 "Cannot access gated
    # repo for url ..."; transformers wraps it as "You are trying to access a gated repo."
    _cause(95, "gated", r"Access to model \S+ is restricted"),
    _cause(92, "gated", r"Cannot access gated repo for url|You are trying to access a gated repo"),
    # A token the Hub refuses, or a private/missing repo (huggingface_hub utils/_http.py:935 and :947).
    _cause(92, "token", r"Invalid credentials in Authorization header|Invalid user token"),
    _cause(88, "token", r"Repository Not Found for url"),
    # The disk: errno 28, and huggingface_hub file_download.py:774's warning before a download that cannot fit.
    _cause(90, "disk", r"No space left on device|Not enough free disk space to download the file"),
    # A flag vLLM's argparse refuses: "usage: vllm ..." then "vllm: error: unrecognized arguments: --x" (the top
    # parser reports extras, vllm/utils/argparse_utils.py:185) or "vllm serve: error: argument --x: ...".
    _cause(90, "flag", r"^(?![\w.]*(?:Error|Exception):)[\w./-]+(?: [\w-]+)?: error: "),
    # vLLM's own summaries of a failed start: they point at the root cause above them.
    _cause(
        50,
        "vllm",
        r"Invalid repository ID or local directory specified|EngineCore failed to start|"
        r"Engine core initialization failed|EngineCore encountered a fatal error",
    ),
    _cause(40, "vllm", r"\bfatal\b"),
    # A traceback's last line (``RuntimeError: ...``, ``huggingface_hub.errors.GatedRepoError: 401 ...``).
    _cause(20, "exception", r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit): \S"),
    _cause(10, "traceback", r"^Traceback \(most recent call last\)"),
)
SPECIFIC = 50  # a vLLM WARNING line counts only with a cause this specific; INFO and DEBUG lines never count

# vLLM 0.33's log prefix (vllm/logger.py:28): "(APIServer pid=1) INFO 05-14 10:00:00 [launcher.py:367] "
_VLLM_PREFIX = re.compile(
    r"^\((?P<proc>[\w-]+) pid=\d+\) (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?:\d\d-\d\d \d\d:\d\d:\d\d )?\[[^\]]*\] ?"
)
# A container starting: vLLM 0.33's banner (vllm/entrypoints/common/startup.py:18, "vLLM server version %s,
# serving model %s", or the logo's "version" line :21, called from vllm/entrypoints/launchers/launcher.py:367),
# earlier versions' "vLLM API server version", and argparse's usage line, printed first when a flag is refused.
_START = re.compile(r"vLLM (?:API )?server version \S+|█ ▀▄▀ █\s+version \S+|^usage: vllm\b")
# A container dying (RunPod's system line, as the fake RunPod words it), or the runtime refusing to start it: that
# refusal is final for this host (its driver will not change), so one is as good as a restart seen
_EXIT = re.compile(r"^Container exited with (?:status|code) [1-9]\d*|nvidia-container-cli: requirement error:")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Python's warnings start with the file that warned ("/usr/.../torch/cuda/__init__.py:182: UserWarning: ..."): noise
_WARNED_AT = re.compile(r"^/\S+\.py:\d+: (?=\w*Warning: )")
_SECRETS = (
    re.compile(r"\bhf_[A-Za-z0-9]{8,}"),  # Hugging Face tokens
    re.compile(r"\brpa_[A-Za-z0-9_]{8,}"),  # RunPod API keys
    re.compile(r"(?i)(?<=bearer )[^\s\"',]+"),
    re.compile(r"(?i)(?<![\w-])((?:[\w-]*api[_-]?key|[\w-]*token|password|secret)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
)


def clean(line: str) -> str:
    """The line as a user should read it: no colours, no carriage returns, no vLLM prefix, one space."""
    text = _ANSI.sub("", line).replace("\r", " ")
    return " ".join(_WARNED_AT.sub("", _VLLM_PREFIX.sub("", text.strip())).split())


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the given secret values, nor anything shaped like a token or key."""
    for value in secrets:
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


def _rank(line: str) -> Cause | None:
    """The most specific cause ``line`` shows, if any."""
    prefix = _VLLM_PREFIX.match(_ANSI.sub("", line).strip())
    level = prefix.group("level") if prefix else "ERROR"
    if level in ("DEBUG", "INFO"):
        return None
    text = clean(line)
    found = [c for c in CAUSES if c.pattern.search(text) and (level != "WARNING" or c.rank >= SPECIFIC)]
    return max(found, key=lambda c: c.rank) if found else None


@dataclass(frozen=True)
class Verdict:
    line: str  # what explains it, cleaned and redacted: fit to show on one line
    kind: str  # driver, memory, gated, token, disk, flag, vllm, exception, traceback, restarts
    restarts: int


@dataclass
class _Best:
    rank: int
    kind: str
    line: str


class CrashLoopDetector:
    """Evidence gathered while a pod starts. ``uptime`` and ``window`` feed it; ``verdict`` decides."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = [s for s in secrets if s]
        self.resets = 0  # times runtime.uptime went back: the container started again
        self.window_restarts = 0  # the most restarts one log window showed
        self._uptime: int | None = None
        self._best: _Best | None = None
        self._last = ""

    def uptime(self, seconds: int | None) -> None:
        """A ``runtime.uptime`` sample. Seconds since the container started only grow, but for a restart."""
        if seconds is None:
            return  # no runtime (between containers, or not reported): neither evidence nor a new baseline
        # a second less could be two clocks disagreeing; a new container is back near zero or clearly lower
        if self._uptime is not None and seconds < self._uptime and (seconds < 5 or self._uptime - seconds > 1):
            self.resets += 1
        self._uptime = seconds

    def window(self, lines: Sequence[str]) -> None:
        """A tail of the pod's log, oldest first. Windows may overlap: restarts are counted within one."""
        cycles, started, fatal, ended = 1, False, False, False
        exits = 0
        for line in lines:
            text = clean(line)
            if not text:
                continue
            is_start = bool(_START.search(text))
            if ended or (is_start and (started or fatal)):  # a line after an exit, or a second start: new container
                cycles, started, fatal, ended = cycles + 1, False, False, False
            started = started or is_start
            if _EXIT.search(text):
                ended, exits = True, exits + 1
            cause = _rank(line)
            if cause is not None:
                fatal = True
                if self._best is None or cause.rank > self._best.rank:
                    self._best = _Best(cause.rank, cause.kind, text)
            self._last = text
        self.window_restarts = max(self.window_restarts, cycles - 1, exits)

    @property
    def restarts(self) -> int:
        return max(self.resets, self.window_restarts)

    def verdict(self) -> Verdict | None:
        """A crash loop, on clear evidence only; None while a slow start is still possible."""
        restarts = self.restarts
        if restarts >= 1 and self._best is not None:
            return Verdict(self._shown(self._best), self._best.kind, restarts)
        if restarts >= RESTARTS_ALONE:
            last = f" (last log line: {self._cut(redact(self._last, self.secrets))})" if self._last else ""
            return Verdict(
                f"its container restarted {restarts} times without an error line{last}", "restarts", restarts
            )
        return None

    def explanation(self) -> str | None:
        """The line that best explains a start that failed, verdict or not (a pod that exited, for one)."""
        return self._shown(self._best) if self._best is not None else None

    def _shown(self, best: _Best) -> str:
        if best.kind == "traceback":  # the header says nothing by itself, and reads like our own crash
            return "a Python traceback in the pod's log (see `python3 manage_pod.py --logs`)"
        return self._cut(redact(best.line, self.secrets))

    @staticmethod
    def _cut(text: str) -> str:
        return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def best_line(lines: Sequence[str], secrets: Iterable[str] = ()) -> str | None:
    """The line of ``lines`` that best explains a failed start, redacted; None if none does."""
    detector = CrashLoopDetector(secrets)
    detector.window(lines)
    return detector.explanation()


def progress_line(lines: Sequence[str], secrets: Iterable[str] = ()) -> str | None:
    """The newest line of a log window worth showing beside the progress (not a bare traceback header)."""
    shown = [clean(line) for line in lines]
    shown = [text for text in shown if text and not text.startswith("Traceback (most recent call last)")]
    return redact(shown[-1], secrets) if shown else None


def billed(seconds: float, dollars: float) -> str:
    """How long a pod billed and about how much, for a one-line message: "12s, under $0.01 billed"."""
    money = f"about ${dollars:.2f}" if dollars >= 0.005 else "under $0.01"
    return f"{seconds:.0f}s, {money} billed"
