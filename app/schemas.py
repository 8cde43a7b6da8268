"""Request and response bodies of the HTTP API (pydantic). Database models live in `app.db.models`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from sstmerge_core.jobspec import EvaluationSettings

T = TypeVar("T")
HF_ADAPTER = r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$"
HF_DATASET = r"^hf://(datasets/)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$"
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(default=None, description="pass as `cursor` to get the next page")


class ModelOut(BaseModel):
    name: str = Field(description="the value to put in a job's `base_model`")
    source: Literal["local", "hub"]
    model_type: str | None = None


class ModelList(BaseModel):
    items: list[ModelOut]
    hub_enabled: bool = Field(description="whether any Hub id `org/name[@revision]` may be used")


class AdapterSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(pattern=HF_ADAPTER, examples=["hf://org/my-lora@main"])
    name: str | None = Field(default=None, max_length=200)


class AdapterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    rank: int
    target_modules: list[str]
    sha256: str
    base_model_hint: str | None
    created_at: datetime


class DatasetSource(BaseModel):
    """A Hub dataset with a column mapping; its rows are copied into storage as JSONL at creation."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(pattern=HF_DATASET, examples=["hf://datasets/org/prompts@main"])
    split: str = "train"
    prompt_column: str = "prompt"
    response_column: str | None = "response"
    limit: int | None = Field(default=None, ge=1)
    name: str | None = Field(default=None, max_length=200)


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    rows: int
    columns: list[str]
    sha256: str
    created_at: datetime


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str
    weight: float = Field(default=1.0, allow_inf_nan=False)


class EvaluationRequest(EvaluationSettings):
    """Held-out evaluation sets (dataset ids) and generation/judging settings (§5)."""

    harmful_dataset_id: str
    benign_dataset_id: str
    utility_eval_dataset_id: str


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="a name from GET /models or a Hub id `org/name[@revision]`")
    utility_adapters: list[AdapterRef] = Field(default_factory=list)
    safety_adapter: AdapterRef
    utility_dataset_id: str | None = None
    safety_dataset_id: str | None = None
    method: str = "sst"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters; unknown keys are a 422")
    evaluation: EvaluationRequest | None = None
    compare_with: list[str] = Field(default_factory=list)

    def adapter_refs(self) -> list[AdapterRef]:
        return [*self.utility_adapters, self.safety_adapter]

    def dataset_ids(self) -> list[str]:
        ids = [self.utility_dataset_id, self.safety_dataset_id]
        if self.evaluation:
            ev = self.evaluation
            ids += [ev.harmful_dataset_id, ev.benign_dataset_id, ev.utility_eval_dataset_id]
        return [i for i in ids if i]


class Progress(BaseModel):
    stage: str | None
    percent: float


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    status: JobStatus
    progress: Progress
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: dict[str, Any]
    summary: dict[str, Any] | None
    cancel_requested: bool
    attempts: int


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    kind: str
    stage: str | None
    percent: float | None
    message: str


class ReadyOut(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]
