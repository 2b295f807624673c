"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AdapterDetail",
    "AdapterList",
    "AdapterSummary",
    "BackboneInfo",
    "ErrorBody",
    "HypernetworkList",
    "HypernetworkSummary",
    "Output",
    "PredictParameters",
    "PredictRequest",
    "PredictResponse",
    "Residency",
    "SetCurrent",
    "UploadResult",
    "VersionDetail",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictParameters(_Strict):
    """Optional knobs of a predict request."""

    return_all_scores: bool = Field(default=False, description="Also return every label's probability.")
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Tokens to generate per input (generative backbones); capped by settings.",
    )


Input = str | tuple[str, str]


class PredictRequest(_Strict):
    """`{"inputs": [...], "parameters": {...}}`: strings, or `[text_a, text_b]` pairs."""

    inputs: list[Input] = Field(min_length=1, description="Texts, or [text_a, text_b] pairs.")
    parameters: PredictParameters = Field(default_factory=PredictParameters)


class Output(BaseModel):
    """One input's result; which fields appear depends on the task's head."""

    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    labels: list[str] | None = None
    value: float | None = None
    generated_text: str | None = None


class PredictResponse(BaseModel):
    """The outputs of a predict request, all from one adapter version."""

    task: str
    version: int
    outputs: list[Output]


class UploadResult(BaseModel):
    """What an upload stored."""

    task: str
    version: int
    sha256: str
    method: str
    num_parameters: int
    size_bytes: int
    current: bool = Field(description="Whether this version is now the one serving.")


class HypernetworkSummary(BaseModel):
    """A shared hypernetwork in the list."""

    name: str
    current_version: int | None
    versions: list[int]
    variant: str | None = None
    sites: list[str] | None = None
    bottleneck_dim: int | None = None
    task_embedding_dim: int | None = None


class HypernetworkList(BaseModel):
    """Every hypernetwork."""

    hypernetworks: list[HypernetworkSummary]


class VersionDetail(BaseModel):
    """One stored version."""

    version: int
    sha256: str
    size_bytes: int
    created_at: str


class Residency(BaseModel):
    """Where a task's versions are loaded."""

    device: list[int] = Field(description="Versions resident in device slots.")
    host: list[int] = Field(description="Versions decoded in host memory.")
    pinned: bool = Field(description="Whether the current version is pinned on the device.")


class AdapterSummary(BaseModel):
    """A task in the list."""

    task: str
    current_version: int | None
    method: str | None


class AdapterList(BaseModel):
    """Every task."""

    adapters: list[AdapterSummary]


class AdapterDetail(AdapterSummary):
    """A task with its versions and residency."""

    versions: list[VersionDetail]
    residency: Residency
    in_flight: int = Field(description="Requests being served by this task now.")


class SetCurrent(_Strict):
    """`{"version": N}`: the version to serve from now on."""

    version: int = Field(ge=1)


class BackboneInfo(BaseModel):
    """The loaded backbone."""

    name: str
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    fingerprint: str
    generative: bool
    device: str
    dtype: str
    slots: int


class ErrorBody(BaseModel):
    """`{"error": {"type", "message"}}` (OpenAI routes add `param` and `code`, which may be null)."""

    error: dict[str, str | None]
