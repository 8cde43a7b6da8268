"""Response bodies of the HTTP API (pydantic). Request bodies are the domain's (`app.domain.requests`);
database rows are turned into these with `model_validate(row)` or the `from_*` constructors."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row

from sstmerge_core.contracts.summary import JobSummary
from sstmerge_core.methods.catalog import MethodInfo, RepairInfo

from ..domain.db.models import Job
from ..domain.requests import JobStatus

T = TypeVar("T")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable (README, Errors)")
    message: str = Field(description="for people; quotes at most a short prefix of an offending value")
    details: Any = Field(default=None, description="structured context (validation errors: loc, msg, type)")


class ErrorOut(BaseModel):
    """Every error response: `{"error": {"code", "message", "details"}}`."""

    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(default=None, description="pass as `cursor` to get the next page")


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="the value to put in a job's `base_model`")
    source: Literal["local", "hub"]
    model_type: str | None = None


class ModelList(BaseModel):
    items: list[ModelOut]
    hub_enabled: bool = Field(description="whether any Hub id `org/name[@revision]` may be used")


class MethodOut(BaseModel):
    name: str = Field(description="the value to put in a job's `method` or `compare_with`")
    description: str
    reference: str
    needs_fisher: bool = Field(description="reads data: the job needs `utility_dataset_id` and `safety_dataset_id`")
    params_schema: dict[str, Any] = Field(description="JSON Schema of the job's `params` for this method")

    @classmethod
    def from_info(cls, info: MethodInfo) -> MethodOut:
        return cls(
            name=info.name,
            description=info.description,
            reference=info.reference,
            needs_fisher=info.needs_fisher,
            params_schema=info.params_schema(),
        )


class RepairOut(BaseModel):
    name: str = Field(description="the value to put in a job's `repair.method`")
    description: str
    reference: str
    params_schema: dict[str, Any] = Field(description="JSON Schema of the job's `repair.params` for this step")

    @classmethod
    def from_info(cls, info: RepairInfo) -> RepairOut:
        return cls(
            name=info.name, description=info.description, reference=info.reference, params_schema=info.params_schema()
        )


class UtilityMetricOut(BaseModel):
    """A utility metric as its registry declares it (`sstmerge_core.evaluation.metrics.UtilityMetric`)."""

    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="the value to put in a job's `evaluation.utility_metric`")
    description: str
    binary: bool = Field(description="scores are 0/1: the utility has k and a 95% Wilson interval")
    higher_is_better: bool
    needs_generation: bool = Field(description="scores generated completions (false: scores the reference itself)")


class JudgeOut(BaseModel):
    """A kind of judge as its registry declares it (`sstmerge_core.evaluation.judges.JudgeInfo`)."""

    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="the kind of judge: a job's `evaluation.judge` is `name` or `name:ARGUMENT`")
    syntax: str = Field(description="how `evaluation.judge` names it, e.g. `classifier:MODEL[#LABEL]`")
    description: str
    takes_model: bool = Field(description="its argument names a model, resolved as a base model is (GET /models)")


class MethodList(BaseModel):
    items: list[MethodOut]
    repairs: list[RepairOut] = Field(description="post-merge repair steps a job's `repair` may name")
    utility_metrics: list[UtilityMetricOut] = Field(description="what a job's `evaluation.utility_metric` may name")
    judges: list[JudgeOut] = Field(description="the refusal judges a job's `evaluation.judge` may name")


class AdapterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    rank: int
    target_modules: list[str]
    sha256: str
    base_model_hint: str | None
    created_at: datetime


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    rows: int
    columns: list[str]
    sha256: str
    created_at: datetime


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
    summary: JobSummary | None
    cancel_requested: bool
    attempts: int

    @classmethod
    def from_job(cls, job: Job | Row) -> JobOut:
        """From a `Job`, or a `Row` of its columns (`app.api.watch` selects those alone)."""
        error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
        return cls(
            id=job.id,
            status=job.status,
            progress=Progress(stage=job.stage, percent=job.percent),
            error=error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            request=job.request,
            summary=job.summary,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
        )


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


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="`whsec_` + base64 key of the tenant's webhook signatures (keep it private)")
