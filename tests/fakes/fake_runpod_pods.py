"""The fake RunPod's model of the world, used by tests/fakes/fake_runpod.py.

The GPU catalog (REST v2 ``GpuType`` shapes), validation of a ``CreatePodRequest`` with the spec's
``unevaluatedProperties: false`` semantics, and ``FakePod``: a pod whose status, runtime, cost and logs
follow from the time since it was created. See /work/shared/reference/runpod.md, sections 1b and 8.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shlex
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
NO_CAPACITY = "this GPU and data center combination could not be placed"  # the spec's words for it (createPod)
# what RunPod answers in practice (runpod.md 7; mlabonne/llm-autoeval#3); the fake's default (capacity_wording)
NO_CAPACITY_LIVE = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
POOL_FORBIDDEN = "access denied"  # the spec's ForbiddenError example ("token is valid, but ... no access")
# What the fake's hosts report as cudaVersion (their driver's CUDA), newest first. A create without a CUDA floor
# lands on the oldest (place): RunPod promises only what the request constrains, and the fake is never kinder.
CUDA_VERSIONS = ("13.0", "12.8", "12.4")
DATA_CENTERS = {"US-KS-2": "US Kansas 2", "EU-RO-1": "EU Romania 1", "CA-MTL-1": "CA Montreal 1"}
ACTIONS = {
    "PROVISIONING": ["stop", "terminate"],
    "STARTING": ["stop", "terminate"],
    "RUNNING": ["stop", "restart", "terminate"],
    "EXITED": ["start", "terminate"],
    "ERROR": ["start", "terminate"],
    "TERMINATED": [],
}
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"  # vLLM's own default when no model is given
VLLM_PREFIX = "(APIServer pid=1) INFO"
# The CUDA an image's binaries need of the host's driver, by vllm/vllm-openai release (major, minor) from, newest
# first. The fake's own knowledge, kept apart from llmpod's table on purpose (a fake that shared it could never
# disagree). From the wheels on PyPI: 0.20.0 and 0.34.0 link libcudart.so.13 (nvcc 13.0), 0.12.0 and 0.19.1
# libcudart.so.12 (nvcc 12.9), 0.9.2 nvcc 12.8, 0.8.5 torch 2.6.0 (cu124). 0.10/0.11 unknown: no need stated.
IMAGE_CUDA = (((0, 20), "13.0"), ((0, 12), "12.9"), ((0, 10), None), ((0, 9), "12.8"), ((0, 8), "12.4"))


class Problem(Exception):
    """An RFC 9457 error answer: ``{"title", "status", "detail"}`` (+ ``errors`` for 422)."""

    def __init__(
        self, status: int, detail: str, *, errors: list[str] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors, headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"title": TITLES.get(self.status, "Error"), "status": self.status, "detail": self.detail}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


# ---------------------------------------------------------------------------------------------------------
# The GPU catalog


@dataclass(frozen=True)
class GpuType:
    id: str
    name: str
    pool: str | None
    memory: int
    secure_price: float
    community_price: float
    serverless_price: float | None
    max_count: tuple[int, int]  # secure, community
    data_centers: tuple[str, ...]
    cudas: tuple[str, ...] = CUDA_VERSIONS  # its hosts' CUDA versions, newest first

    def price(self, cloud: str) -> float:
        return self.secure_price if cloud == "SECURE" else self.community_price

    def offered(self, cloud: str, count: int) -> bool:
        return count <= self.max_count[0 if cloud == "SECURE" else 1]

    def to_json(
        self, availability: tuple[int, str] | None = None, no_capacity: bool = False, min_cuda: str | None = None
    ) -> dict[str, Any]:
        """The v2 ``GpuType``; ``availability`` = (count, cloud) when ``include=AVAILABILITY`` was asked. The spec's
        ``minCudaVersion`` scopes availability rather than the list (unlike a ``countryCodes`` list): a type with no
        host at or above ``min_cuda`` is still listed, with availability NONE, no dataCenters and no cudaVersions."""
        price: dict[str, float] = {"secure": self.secure_price, "community": self.community_price}
        if self.serverless_price is not None:
            price["serverless"] = self.serverless_price
        body: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "pool": self.pool,
            "manufacturer": "NVIDIA",
            "memory": self.memory,
            "secure": True,
            "community": True,
            "price": price,
            "maxCount": {"secure": self.max_count[0], "community": self.max_count[1]},
        }
        if availability is not None:
            cudas = [v for v in self.cudas if version(v) >= version(min_cuda or "0")]
            free = self.offered(availability[1], availability[0]) and not no_capacity and bool(cudas)
            body["availability"] = "HIGH" if free else "NONE"
            if free:
                body["dataCenters"] = [
                    {"id": dc, "name": DATA_CENTERS[dc], "availability": "HIGH"} for dc in self.data_centers
                ]
            if cudas:  # "absent entirely for a GPU type with none"
                body["cudaVersions"] = [{"version": v, "available": free} for v in cudas]
        return body


GPU_TYPES = (
    GpuType("NVIDIA RTX A6000", "RTX A6000", "AMPERE_48", 48, 0.49, 0.33, 1.22, (8, 8), ("US-KS-2", "EU-RO-1")),
    GpuType("NVIDIA L40S", "L40S", "ADA_48_PRO", 48, 0.86, 0.79, 1.90, (8, 8), ("US-KS-2", "CA-MTL-1")),
    GpuType(
        "NVIDIA GeForce RTX 4090",
        "RTX 4090",
        "ADA_24",
        24,
        0.44,
        0.31,
        1.1,
        (8, 4),
        ("US-KS-2", "EU-RO-1"),
        ("12.8", "12.4"),
    ),  # only older drivers: an image needing CUDA 13 finds no host for it
    GpuType("NVIDIA A100 80GB PCIe", "A100 PCIe", "AMPERE_80", 80, 1.64, 1.19, 2.72, (8, 8), ("CA-MTL-1",)),
    GpuType("NVIDIA H100 80GB HBM3", "H100 SXM", "ADA_80_PRO", 80, 2.69, 2.39, 4.18, (8, 8), ("US-KS-2",)),
)
GPUS = {gpu.id: gpu for gpu in GPU_TYPES}


def availability_query(params: Mapping[str, str]) -> tuple[int, str] | None:
    """(count, cloud) when ``include=AVAILABILITY`` was asked, else None; 400/422 as the spec says."""
    include = [v for v in params.get("include", "").split(",") if v]
    products = [v for v in params.get("product", "").split(",") if v]
    bad = [f"include: '{v}' is not one of AVAILABILITY" for v in include if v != "AVAILABILITY"]
    bad += [
        f"product: '{v}' is not one of POD, CLUSTER, SERVERLESS"
        for v in products
        if v not in ("POD", "CLUSTER", "SERVERLESS")
    ]
    count, cloud = params.get("count", "1"), params.get("cloud", "SECURE")
    if not count.isdigit() or int(count) < 1:
        bad.append(f"count: must be an integer >= 1, got {count!r}")
    if cloud not in ("SECURE", "COMMUNITY"):
        bad.append(f"cloud: '{cloud}' is not one of SECURE, COMMUNITY")
    if bad:
        raise Problem(422, "Request validation failed.", errors=bad)
    if include and not products:
        raise Problem(400, "product is required with include=AVAILABILITY")
    filters = [
        name
        for name in ("product", "count", "cloud", "countryCodes", "cudaVersions", "minCudaVersion")
        if name in params
    ]
    if not include and filters:
        raise Problem(400, f"{filters[0]} is valid only with include=AVAILABILITY")
    return (int(count), cloud) if include else None


def min_cuda_query(params: Mapping[str, str]) -> str | None:
    """The ``minCudaVersion`` floor of a catalog read (major or major.minor: a bare major is allowed there), or
    None; 422 if malformed, 400 with ``cudaVersions`` (the spec's MinCudaVersionFilter)."""
    floor = params.get("minCudaVersion")
    if floor is None:
        return None
    if not re.fullmatch(r"\d+(\.\d+)?", floor):
        raise Problem(
            422,
            "Request validation failed.",
            errors=[f"minCudaVersion: {floor!r} is not a major or major.minor version"],
        )
    if "cudaVersions" in params:
        raise Problem(400, "cudaVersions and minCudaVersion are mutually exclusive")
    return floor


# ---------------------------------------------------------------------------------------------------------
# CreatePodRequest. Fields typed without ``| None`` default to None when absent, but an explicit JSON null is a
# type error, as under the spec's JSON schema; ``registry`` is the one nullable field.

_Cuda = Annotated[str, StringConstraints(pattern=r"^\d+\.\d+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateGpuConfig(_Strict):
    id: str
    count: int = Field(1, ge=1)
    allowedCudaVersions: list[_Cuda] = Field(None)
    minCudaVersion: _Cuda = Field(None)


class CreateCpuConfig(_Strict):
    id: str = Field(min_length=1)
    vcpuCount: int = Field(ge=2)


class PersistentMount(_Strict):
    size: int = Field(ge=10)
    path: str


class NetworkMount(_Strict):
    volumeId: str
    path: str


class Mounts(_Strict):
    persistent: PersistentMount = Field(None)
    network: list[NetworkMount] = Field(None, max_length=1)


class CreatePodRequest(_Strict):
    name: str = Field(min_length=1)
    image: str = Field(None)
    templateId: str = Field(None, min_length=1)
    args: str = Field(None)
    disk: int = Field(None, ge=1)
    env: dict[str, str] = Field(None)
    ports: list[str] = Field(None)
    registry: str | None = None
    cloud: Literal["SECURE", "COMMUNITY"] = "SECURE"
    gpu: CreateGpuConfig = Field(None)
    cpu: CreateCpuConfig = Field(None)
    dataCenterIds: list[str] = Field(None)
    mounts: Mounts = Field(None)
    globalNetworking: bool = False
    startSsh: bool = False
    startJupyter: bool = False


_WANT = {
    "string": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "list": "array",
    "dict": "object",
    "model": "object",
    "model_attributes": "object",
}


def _json_type(value: Any) -> str:
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return "null"


def _path(loc: tuple[int | str, ...]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def validation_errors(exc: ValidationError) -> list[str]:
    """Pydantic's errors worded as the v2 API's JSON-schema validator words them."""
    messages: list[str] = []
    for err in exc.errors():
        loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx", {})
        if kind == "extra_forbidden":
            message = f"{_path(loc[:-1])}: additional properties '{loc[-1]}' not allowed"
        elif kind == "missing":
            message = f"{_path(loc[:-1])}: missing property '{loc[-1]}'"
        elif kind.endswith("_type") and kind[:-5] in _WANT:
            message = f"{_path(loc)}: got {_json_type(err['input'])}, want {_WANT[kind[:-5]]}"
        elif kind in ("string_too_short", "too_short"):
            message = f"{_path(loc)}: minLength: got {len(err['input'])}, want {ctx.get('min_length')}"
        elif kind == "too_long":
            message = f"{_path(loc)}: maxItems: got {len(err['input'])}, want {ctx.get('max_length')}"
        elif kind == "greater_than_equal":
            message = f"{_path(loc)}: minimum: got {err['input']}, want {ctx.get('ge')}"
        elif kind == "string_pattern_mismatch":
            message = f"{_path(loc)}: '{err['input']}' does not match pattern '{ctx.get('pattern')}'"
        elif kind == "literal_error":
            message = f"{_path(loc)}: value must be one of {ctx.get('expected')}"
        else:
            message = f"{_path(loc)}: {err['msg']}"
        if message not in messages:
            messages.append(message)
    return messages


def parse_create(body: Any) -> CreatePodRequest:
    """Validate a ``POST /v2/pods`` body: 422 for the schema, 400 for the handler's cross-field rules."""
    if not isinstance(body, dict):
        raise Problem(422, "Request validation failed.", errors=[f"$: got {_json_type(body)}, want object"])
    try:
        req = CreatePodRequest.model_validate(body)
    except ValidationError as exc:
        raise Problem(422, "Request validation failed.", errors=validation_errors(exc)) from None
    if req.image is None and req.templateId is None:
        raise Problem(422, "Request validation failed.", errors=["$: missing property 'image'"])
    if (req.gpu is None) == (req.cpu is None):
        raise Problem(400, "exactly one of gpu or cpu is required")
    if req.mounts is not None and req.mounts.persistent is not None and req.mounts.network is not None:
        raise Problem(400, "mounts.persistent and mounts.network are mutually exclusive")
    if req.gpu is not None and req.gpu.allowedCudaVersions and req.gpu.minCudaVersion is not None:
        raise Problem(400, "gpu.allowedCudaVersions and gpu.minCudaVersion are mutually exclusive")
    if req.templateId is not None:
        raise Problem(404, "template not found")  # the fake knows no templates
    if req.cpu is not None:
        raise Problem(400, "the fake RunPod places GPU pods only")
    return req


def place(req: CreatePodRequest, gpu: GpuType) -> tuple[str, str]:
    """The data centre and CUDA version for a GPU pod, or the no-capacity 400."""
    assert req.gpu is not None
    cudas = [v for v in gpu.cudas if version(v) >= version(req.gpu.minCudaVersion or "0.0")]
    if req.gpu.allowedCudaVersions:
        cudas = [v for v in cudas if v in req.gpu.allowedCudaVersions]
    centers = [dc for dc in gpu.data_centers if not req.dataCenterIds or dc in req.dataCenterIds]
    if not cudas or not centers or not gpu.offered(req.cloud, req.gpu.count):
        raise Problem(400, NO_CAPACITY)
    return centers[0], cudas[-1]  # the oldest host the request allows: see CUDA_VERSIONS


def image_cuda_need(image: str | None) -> str | None:
    """The host CUDA an image needs to start, when the fake knows it (vllm/vllm-openai tags only)."""
    repo, _, tag = (image or "").rpartition(":")
    parts = tag.removeprefix("v").split(".")
    if repo != "vllm/vllm-openai" or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    release = (int(parts[0]), int(parts[1]))
    return next((cuda for first, cuda in IMAGE_CUDA if release >= first), None)


def driver_too_old(host_cuda: str, image: str | None, env: Mapping[str, str] | None = None) -> CrashLoop:
    """An image built for a newer CUDA than the host's driver, every time RunPod tries to start it.

    vllm/vllm-openai is built on nvidia/cuda, whose NVIDIA_REQUIRE_CUDA makes the NVIDIA container runtime refuse
    the container before anything in it runs: RunPod's system log shows "start container for IMAGE: begin", the
    OCI error and "nvidia-container-cli: requirement error: unsatisfied condition: cuda>=X" (as RunPod users
    report it: Nerogar/OneTrainer#981; vllm-project/vllm#18813), with no container, so no runtime and no uptime.
    With that gate disabled (NVIDIA_DISABLE_REQUIRE, NVIDIA's own workaround) the container starts and vLLM dies
    instead (:func:`_torch_driver_too_old`)."""
    need = image_cuda_need(image) or "13.0"
    if (env or {}).get("NVIDIA_DISABLE_REQUIRE", "").lower() not in ("1", "true"):
        return CrashLoop(
            (
                "error starting container: Error response from daemon: failed to create task for container: failed to "
                "create shim task: OCI runtime create failed: runc create failed: unable to start container process: "
                "error during container init: error running prestart hook #0: exit status 1, stdout: , stderr: "
                "Auto-detected mode as 'legacy'",
                f"nvidia-container-cli: requirement error: unsatisfied condition: cuda>={need}, please update your "
                "driver to a newer version, or use an earlier cuda container: unknown",
            ),
            started=False,
        )
    return _torch_driver_too_old(host_cuda, image)


def _torch_driver_too_old(host_cuda: str, image: str | None) -> CrashLoop:
    """What vLLM prints on a host whose driver is older than its CUDA, every time RunPod restarts it: PyTorch's
    warning (c10/cuda/CUDAFunctions.cpp, torch 2.14.1: cudaDriverGetVersion's number, 1000 x major + 10 x minor),
    then vLLM finds no device and exits 1."""
    major, minor = version(host_cuda)[:2]
    return CrashLoop(
        (
            "/usr/local/lib/python3.12/dist-packages/torch/cuda/__init__.py:182: UserWarning: CUDA initialization: "
            f"The NVIDIA driver on your system is too old (found version {major * 1000 + minor * 10}). Please update "
            "your GPU driver by downloading and installing a new version from the URL: "
            "http://www.nvidia.com/Download/index.aspx Alternatively, go to: https://pytorch.org to install a PyTorch "
            "version that has been compiled with your version of the CUDA driver. (Triggered internally at "
            "/pytorch/c10/cuda/CUDAFunctions.cpp:119.)",
            "Traceback (most recent call last):",
            '  File "/usr/local/bin/vllm", line 10, in <module>',
            "    sys.exit(main())",
            # vLLM 0.33.0 vllm/config/device.py:56
            "RuntimeError: Failed to infer device type, please set the environment variable `VLLM_LOGGING_LEVEL=DEBUG` "
            "to turn on verbose logging to help debug the issue.",
        ),
        version=_image_tag_version(image),
    )


def _image_tag_version(image: str | None) -> str:
    tag = (image or "").rpartition(":")[2].removeprefix("v")
    return tag if tag and tag[0].isdigit() else "0.33.0"


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# ---------------------------------------------------------------------------------------------------------
# What the container runs: vLLM's flags, read from ``args`` as the vllm/vllm-openai entrypoint would


@dataclass(frozen=True)
class VllmLaunch:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    max_model_len: int | None = None
    api_key: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None


def parse_vllm_args(args: str, env: dict[str, str]) -> VllmLaunch:
    """Read ``--model`` (or a positional model), ``--served-model-name``, ``--max-model-len``, ``--api-key``
    (else ``env["VLLM_API_KEY"]``), ``--host``, ``--port``, ``--enable-auto-tool-choice`` and
    ``--tool-call-parser``; vLLM's other flags are ignored."""
    try:
        tokens = shlex.split(args)
    except ValueError:
        tokens = []
    if tokens[:2] == ["vllm", "serve"]:
        tokens = tokens[2:]
    options: dict[str, list[str]] = {}
    positional: list[str] = []
    current: list[str] | None = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            current = options.setdefault(name.replace("_", "-"), [])
            current.clear()
            if eq:
                current.append(value)
                current = None
        elif current is not None:
            current.append(token)
        else:
            positional.append(token)

    def first(name: str) -> str | None:
        values = options.get(name)
        return values[0] if values else None

    port = first("port") or "8000"
    return VllmLaunch(
        model=first("model") or (positional[0] if positional else DEFAULT_MODEL),
        served_model_name=first("served-model-name"),
        max_model_len=_context_length(first("max-model-len")),
        api_key=first("api-key") or env.get("VLLM_API_KEY"),
        host=first("host") or "0.0.0.0",
        port=int(port) if port.isdigit() else 8000,
        enable_auto_tool_choice="enable-auto-tool-choice" in options,
        tool_call_parser=first("tool-call-parser"),
    )


def _context_length(text: str | None) -> int | None:
    """vLLM's ``--max-model-len``: ``8192``, ``8k`` (x1000) or ``8K`` (x1024)."""
    if not text:
        return None
    scale = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}.get(text[-1], 1)
    digits = text[:-1] if scale > 1 else text
    return int(digits) * scale if digits.isdigit() and int(digits) > 0 else None


# ---------------------------------------------------------------------------------------------------------
# Pods


@dataclass(frozen=True)
class CrashLoop:
    """A container that dies at start, again and again: RunPod restarts it, so the pod stays RUNNING and billed,
    its uptime goes back to zero at each restart, and its log repeats vLLM's banner and the fatal lines."""

    lines: tuple[str, ...]  # what the container prints just before it dies, every time
    after: float = 2.0  # seconds from a container's start to its death (then the next one starts)
    version: str = "0.33.0"  # the vLLM version its banner shows
    started: bool = True  # False: the runtime refuses to create it (system lines only, no runtime, no uptime)


def new_pod_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(10))


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakePod:
    """One pod. Its phases are fixed at create: PROVISIONING, STARTING, RUNNING, then vLLM listening."""

    request: CreatePodRequest
    gpu: GpuType
    data_center: str
    cuda: str
    provisioning_seconds: float
    starting_seconds: float
    vllm_load_seconds: float
    id: str = field(default_factory=new_pod_id)
    created: float = field(default_factory=time.monotonic)
    created_wall: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    events: list[tuple[str, float]] = field(default_factory=list)  # ERROR/EXITED/TERMINATED, when
    vanished: bool = False
    mock_port: int | None = None
    public_ports: dict[int, int] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exit_line: str | None = None  # why its vLLM refused to start, when it did
    crash: CrashLoop | None = None  # its container crash-loops: RUNNING, never serving

    def __post_init__(self) -> None:
        self.launch = parse_vllm_args(self.request.args or "", self.request.env or {})
        self.public_ports = {port: 10000 + secrets.randbelow(50000) for port in self.exposed("tcp")}

    @property
    def running_at(self) -> float:
        return self.created + self.provisioning_seconds + self.starting_seconds

    @property
    def ready_at(self) -> float:
        return self.running_at + self.vllm_load_seconds

    @property
    def gone(self) -> bool:
        """Terminated or reclaimed: not in the API any more."""
        return any(status == "TERMINATED" for status, _ in self.events)

    def exposed(self, protocol: str) -> list[int]:
        ports = [p.split("/", 1) for p in self.request.ports or []]
        return [int(number) for number, proto in ports if number.isdigit() and proto == protocol]

    def serves_http(self, port: int) -> bool:
        """Whether the proxy reaches vLLM on ``port``: it must listen on it, on all interfaces."""
        return port == self.launch.port and self.launch.host not in ("127.0.0.1", "localhost", "::1")

    def wall(self, moment: float) -> datetime:
        return self.created_wall + timedelta(seconds=moment - self.created)

    def history(self, now: float | None = None) -> list[tuple[str, float]]:
        now = time.monotonic() if now is None else now
        cutoff = min([now] + [at for _, at in self.events])
        timed = [
            ("PROVISIONING", self.created),
            ("STARTING", self.created + self.provisioning_seconds),
            ("RUNNING", self.running_at),
        ]
        return [(status, at) for status, at in timed if at <= cutoff or status == "PROVISIONING"] + self.events

    def status(self, now: float | None = None) -> str:
        return self.history(now)[-1][0]

    def view(self, now: float | None = None) -> dict[str, Any]:
        """The v2 ``Pod`` object."""
        now = time.monotonic() if now is None else now
        status, req = self.status(now), self.request
        assert req.gpu is not None
        networking: dict[str, Any] = {"enabled": req.globalNetworking}
        if req.globalNetworking:
            networking.update(ip=f"10.65.0.{sum(self.id.encode()) % 250 + 2}", internalDns=f"{self.id}.runpod.internal")
        started = any(state == "RUNNING" for state, _ in self.history(now))
        billed = status in ("PROVISIONING", "STARTING", "RUNNING")
        return {
            "id": self.id,
            "name": req.name,
            "status": status,
            "actions": ACTIONS[status],
            "image": req.image,
            "args": req.args or "",
            "disk": req.disk or 50,
            "mounts": req.mounts.model_dump(exclude_none=True) if req.mounts else {},
            "ports": req.ports or [],
            "env": req.env or {},
            "registry": req.registry,
            "cloud": req.cloud,
            "dataCenterId": self.data_center,
            "cudaVersion": self.cuda,
            "ssh": {"proxy": None, "direct": None},
            "template": None,
            "cost": round(self.gpu.price(req.cloud) * req.gpu.count, 4) if billed else 0.0,
            "locked": False,
            "runtime": self.runtime(now) if status == "RUNNING" and (not self.crash or self.crash.started) else None,
            "createdAt": rfc3339(self.created_wall),
            "startedAt": rfc3339(self.wall(self.running_at)) if started else None,
            "globalNetworking": networking,
            "gpu": {"id": self.gpu.id, "count": req.gpu.count},
        }

    def runtime(self, now: float) -> dict[str, Any]:
        assert self.request.gpu is not None
        loaded = now >= self.ready_at  # vLLM takes 90% of the VRAM once the weights are in
        ports = [{"private": p, "public": None, "type": "http", "ip": None} for p in self.exposed("http")]
        ports += [
            {"private": p, "public": public, "type": "tcp", "ip": "203.0.113.17"}
            for p, public in self.public_ports.items()
        ]
        up = now - self.running_at
        return {
            "uptime": int(up % self.crash.after if self.crash else up),
            "ports": ports,
            "gpus": [{"util": 0, "memoryUtil": 90 if loaded else 0} for _ in range(self.request.gpu.count)],
            "cpu": {"util": 3},
            "memory": {"util": 12 if loaded else 4},
        }

    def logs(self, now: float | None = None) -> list[dict[str, str]]:
        """Every log line so far, oldest first, as ``{"id", "ts", "source", "line"}``. Never shows a key."""
        now = time.monotonic() if now is None else now
        cutoff = min([now] + [at for _, at in self.events])
        start, run, ready = self.created + self.provisioning_seconds, self.running_at, self.ready_at
        launch, image = self.launch, self.request.image
        served = launch.served_model_name or launch.model
        timed = [
            (self.created, "system", f"Pod assigned to a machine in {self.data_center}"),
            (self.created, "system", f"Pulling image {image}"),
            (start, "system", f"Pulled image {image}; starting container"),
            (
                start,
                "container",
                f"{VLLM_PREFIX} [utils.py:233] non-default args: {{'model': '{launch.model}'"
                + (f", 'max_model_len': {launch.max_model_len}" if launch.max_model_len else "")
                + "}",
            ),
            (run, "container", f"{VLLM_PREFIX} [weight_utils.py:392] Downloading weights for {launch.model}…"),
            (
                run + self.vllm_load_seconds / 2,
                "container",
                f"{VLLM_PREFIX} [gpu_model_runner.py:2345] Loading model {launch.model}…",
            ),
            (ready, "container", f"{VLLM_PREFIX} [api_server.py:1911] Served model name: {served}"),
            (
                ready,
                "container",
                f"{VLLM_PREFIX} [launcher.py:34] Available routes are: /health, /v1/models, "
                "/v1/chat/completions, /v1/completions",
            ),
            (
                ready,
                "container",
                f"(APIServer pid=1) INFO:     Uvicorn running on http://{launch.host}:{launch.port} "
                "(Press CTRL+C to quit)",
            ),
            (ready, "container", "(APIServer pid=1) INFO:     Application startup complete."),
        ]
        if self.crash is not None:
            timed = timed[:3] + self._crash_cycles(cutoff)
        lines = [item for item in timed if item[0] <= cutoff]
        for status, at in self.events:
            if status in ("ERROR", "EXITED"):
                crash = self.exit_line or "(EngineCore_DP0 pid=212) ERROR EngineCore encountered a fatal error."
                lines.append((at, "container", crash))
                lines.append((at, "system", "Container exited with status 1"))
            elif not self.vanished:
                lines.append((at, "system", "Pod terminated"))
        lines.sort(key=lambda item: item[0])
        logged = []
        for seq, (at, source, line) in enumerate(lines, start=1):
            ts = rfc3339(self.wall(at))
            logged.append({"id": f"{ts}/{seq:012d}", "ts": ts, "source": source, "line": line})
        return logged

    def _crash_cycles(self, cutoff: float, limit: int = 500) -> list[tuple[float, str, str]]:
        """Each start of a crash-looping container until ``cutoff``: banner, fatal lines, exit (bounded)."""
        assert self.crash is not None
        crash, launch, lines = self.crash, self.launch, []
        start = self.running_at
        for _ in range(limit):
            if start > cutoff:
                break
            if not crash.started:  # refused each time RunPod tries: its system log only
                lines.append((start, "system", f"start container for {self.request.image}: begin"))
                lines += [(start, "system", line) for line in crash.lines]
                start += crash.after
                continue
            banner = f"{VLLM_PREFIX} [api_server.py:1839] vLLM API server version {crash.version}"
            args = f"{VLLM_PREFIX} [utils.py:233] non-default args: {{'model': '{launch.model}'}}"
            lines += [(start, "container", banner), (start, "container", args)]
            died = start + crash.after * 0.9
            lines += [(died, "container", line) for line in crash.lines]
            lines.append((died, "system", "Container exited with status 1"))
            start += crash.after
        return lines
