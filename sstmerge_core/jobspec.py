"""What one merge job needs, with every input already resolved to a local path (pydantic, no torch).

The CLI builds a `MergeSpec` from flags and the worker from a stored job; both hand it to
`sstmerge_core.pipeline.run_merge`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .methods.catalog import CATALOG, CommonParams, parse_params

UtilityMetric = Literal["exact_match", "contains", "rouge_l", "nll"]


class AdapterInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    weight: float = 1.0
    name: str | None = None


class EvaluationSettings(BaseModel):
    """Generation and judging settings of an evaluation (SPEC §5), shared with the API's request schema."""

    model_config = ConfigDict(extra="forbid")

    utility_metric: UtilityMetric = "exact_match"
    judge: str = Field(default="keyword", description="`keyword` or `classifier:<model id>`")
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    limit: int | None = Field(default=None, ge=1, description="at most this many prompts per evaluation set")
    batch_size: int = Field(default=8, ge=1)
    utility_tolerance: float = Field(default=0.02, ge=0, description="recommended α: utility_drop ≤ this")
    over_refusal_tolerance: float | None = Field(
        default=None, ge=0, description="recommended α: also over_refusal_increase ≤ this (unbounded when null)"
    )


class EvaluationSpec(EvaluationSettings):
    """Held-out evaluation sets (never the merge's own data), as local paths, and the settings."""

    harmful: str
    benign: str
    utility_eval: str


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="local folder or Hub id `org/name[@revision]`")
    utility: list[AdapterInput] = Field(default_factory=list)
    safety: list[AdapterInput] = Field(min_length=1)
    utility_data: str | None = None
    safety_data: str | None = None
    method: str = "sst"
    params: dict = Field(default_factory=dict)
    compare_with: list[str] = Field(default_factory=list)
    evaluation: EvaluationSpec | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | None = Field(default=None, description="Fisher factor cache (default: ~/.cache/sstmerge)")

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        for name in [self.method, *self.compare_with]:
            if name not in CATALOG:
                raise ValueError(f"unknown method {name!r}; one of {sorted(CATALOG)}")
        parse_params(self.method, self.params)
        if CATALOG[self.method].needs_fisher and not (self.utility_data and self.safety_data):
            raise ValueError(f"method {self.method!r} needs utility_data and safety_data")
        return self

    def method_params(self) -> CommonParams:
        return parse_params(self.method, self.params)
