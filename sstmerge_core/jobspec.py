"""What one merge job needs, with every input already resolved to a local path (pydantic, no torch).

The CLI builds a `MergeSpec` from flags and the worker from a stored job; both hand it to
`sstmerge_core.pipeline.run_merge`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .evaluation.judges import JUDGES, judge_spec_pattern
from .evaluation.metrics import UTILITY_METRICS
from .methods.catalog import CATALOG, REPAIRS, CommonParams, parse_params, parse_repair

if TYPE_CHECKING:
    UtilityMetric = str
else:  # the registry's names, as a Literal: pydantic checks them and the JSON Schema lists them (an `enum`)
    UtilityMetric = Literal[tuple(UTILITY_METRICS)]


class AdapterInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    weight: float = Field(default=1.0, ge=-100, le=100, allow_inf_nan=False, description="w of w·ΔW, within ±100")
    name: str | None = None


class EvaluationSettings(BaseModel):
    """Generation, judging, split and recommendation settings of an evaluation, shared with the API's
    request schema (`sstmerge_core/evaluation/README.md` defines each). Every number has a range; NaN and ±inf
    are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    utility_metric: UtilityMetric = Field(
        default="exact_match",
        description="utility score of a completion against the reference response (`evaluation.metrics."
        "UTILITY_METRICS` defines each; nll: lower is better)",
    )
    judge: str = Field(
        default="keyword",
        max_length=400,
        pattern=judge_spec_pattern(),
        description="refusal judge: "
        + ", ".join(f"`{info.syntax}`" for info in JUDGES.values())
        + " (`evaluation.judges.JUDGES` defines each); the service takes a judge's MODEL as it takes a base model "
        "(a name of GET /models, or an allowed Hub id when the Hub is on), the CLI also a local folder",
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="tokens generated per prompt (greedy)")
    limit: int | None = Field(
        default=None, ge=1, le=1_000_000, description="use only the first N prompts of each set (unset: every row)"
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default="auto",
        description="prompts per generation batch, or `auto`: the most that fit the memory budget (CUDA: free memory "
        "and the KV cache per sequence; CPU: half the weights' size, at most 64)",
    )
    split_seed: int = Field(
        default=0, ge=0, lt=2**31, description="seed of the search/report split of every evaluation set"
    )
    report_fraction: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="share of each evaluation set held out as the report split; the recommendation is chosen on the "
        "rest (the search split)",
    )
    utility_tolerance: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="recommendation: utility_drop ≤ this (in the utility metric's units) on the search split",
    )
    over_refusal_tolerance: float | None = Field(
        default=0.05,
        ge=0,
        le=1,
        description="recommendation: over_refusal_increase ≤ this on the search split (null or 1: unbounded; the "
        "safety adapter's own over-refusal is always a cap)",
    )


class EvaluationSpec(EvaluationSettings):
    """Held-out evaluation sets (never the merge's own data), as local paths, and the settings."""

    harmful: str
    benign: str
    utility_eval: str


class RepairSpec(BaseModel):
    """A post-merge repair step (`methods.catalog.REPAIRS`) and its parameters, applied to every merged model."""

    model_config = ConfigDict(extra="forbid")

    method: str = "refusal_ablation"
    params: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> RepairSpec:
        if self.method not in REPAIRS:
            raise ValueError(f"unknown repair step {self.method!r}; one of {sorted(REPAIRS)}")
        parse_repair(self.method, self.params)
        return self

    def step_params(self) -> BaseModel:
        """The step's parameters, as its declared parameter class."""
        return parse_repair(self.method, self.params)


DATA_INPUTS = ("utility_data", "safety_data", "harmless_data", "borderline_data")
"""The data inputs of a merge job (MergeSpec fields): the Fisher passes' and the repair steps' prompt sets."""


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
    repair: RepairSpec | None = None
    harmless_data: str | None = Field(default=None, description="repair: harmless prompts B (held out from evaluation)")
    borderline_data: str | None = Field(
        default=None, description="repair: borderline-benign prompts P (held out from evaluation)"
    )
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
        if self.repair is not None:
            missing = [k for k in REPAIRS[self.repair.method].needs if not getattr(self, k)]
            if missing:
                raise ValueError(f"repair {self.repair.method!r} needs {', '.join(missing)}")
        elif self.harmless_data or self.borderline_data:
            raise ValueError("harmless_data and borderline_data are inputs of a repair step; none was given")
        return self

    def method_params(self) -> CommonParams:
        return parse_params(self.method, self.params)
