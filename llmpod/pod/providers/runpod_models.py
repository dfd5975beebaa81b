"""The RunPod REST v2 wire shapes we send and read: the create body (validated before it is sent, since v2
answers 422 to any field it does not know) and the pod and GPU-type objects, parsed leniently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmpod.errors import RunPodError

__all__ = ["SNIPPET", "CreatePodRequest", "GpuRequest", "GpuType", "Pod", "shape"]

SNIPPET = 200  # characters of a non-JSON error body quoted in a message


class GpuRequest(BaseModel):
    """The ``gpu`` member of a create body: one GPU type, no server-side fallback list."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    count: int = Field(default=1, ge=1)
    minCudaVersion: str | None = Field(default=None, pattern=r"^\d+\.\d+$")


class CreatePodRequest(BaseModel):
    """Body of ``POST /v2/pods``. v2 answers 422 to any field it does not know, so we refuse them first."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    image: str | None = None
    templateId: str | None = None
    args: str | None = None
    disk: int | None = Field(default=None, ge=1)
    env: dict[str, str] = Field(default_factory=dict, repr=False)  # holds VLLM_API_KEY / HF_TOKEN
    ports: list[str] = Field(default_factory=list)
    cloud: Literal["SECURE", "COMMUNITY"] = "SECURE"
    gpu: GpuRequest
    dataCenterIds: list[str] | None = None

    @model_validator(mode="after")
    def _image_or_template(self) -> CreatePodRequest:
        if not self.image and not self.templateId:
            raise ValueError("a pod needs an image or a templateId")
        return self

    def body(self) -> dict[str, Any]:
        """The JSON body as sent: no null fields."""
        return self.model_dump(mode="json", exclude_none=True)


@dataclass(frozen=True)
class Pod:
    """The parts of a v2 ``Pod`` we use; ``raw`` keeps the whole object (its ``env`` holds secrets)."""

    id: str
    name: str
    status: str
    cost_per_hour: float
    gpu_id: str | None
    created_at: str | None
    started_at: str | None
    uptime_seconds: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"

    @property
    def gone(self) -> bool:
        return self.status == "TERMINATED"

    @classmethod
    def from_json(cls, data: Any) -> Pod:
        """Parse one pod object, tolerating missing optional fields and fields we do not know."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise RunPodError(f"RunPod returned a pod without an id ({shape(data)})")
        gpu = data.get("gpu")
        runtime = data.get("runtime")  # null when not RUNNING, though the spec's own example has {}
        uptime = runtime.get("uptime") if isinstance(runtime, dict) else None
        return cls(
            id=data["id"],
            name=str(data.get("name") or ""),
            status=str(data.get("status") or "UNKNOWN"),
            cost_per_hour=_float(data.get("cost")),
            gpu_id=_str_or_none(gpu.get("id")) if isinstance(gpu, dict) else None,
            created_at=_str_or_none(data.get("createdAt")),
            started_at=_str_or_none(data.get("startedAt")),
            uptime_seconds=int(uptime) if isinstance(uptime, (int, float)) and not isinstance(uptime, bool) else None,
            raw=data,
        )


@dataclass(frozen=True)
class GpuType:
    """One entry of the v2 GPU catalog. Prices are USD per hour for a single GPU."""

    id: str
    name: str
    memory_gb: int
    price_secure: float
    price_community: float
    secure: bool
    community: bool
    availability: str | None  # NONE | LOW | MEDIUM | HIGH; None when not requested

    def price(self, cloud: str) -> float:
        """The list price per GPU-hour on ``cloud`` (``SECURE`` or ``COMMUNITY``)."""
        prices = {"SECURE": self.price_secure, "COMMUNITY": self.price_community}
        if cloud.upper() not in prices:
            raise ValueError(f"unknown cloud {cloud!r}: expected SECURE or COMMUNITY")
        return prices[cloud.upper()]

    @classmethod
    def from_json(cls, data: Any) -> GpuType:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise RunPodError(f"RunPod returned a GPU type without an id ({shape(data)})")
        price: dict[str, Any] = data["price"] if isinstance(data.get("price"), dict) else {}
        return cls(
            id=data["id"],
            name=str(data.get("name") or data["id"]),
            memory_gb=int(_float(data.get("memory"))),
            price_secure=_float(price.get("secure")),
            price_community=_float(price.get("community")),
            secure=bool(data.get("secure")),
            community=bool(data.get("community")),
            availability=_str_or_none(data.get("availability")),
        )


def shape(data: Any) -> str:
    # never the values: a pod object's env holds the vLLM and Hugging Face keys
    if isinstance(data, dict):
        return "an object with keys " + ", ".join(sorted(map(str, data)))[:SNIPPET]
    return f"a JSON {type(data).__name__}"


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
