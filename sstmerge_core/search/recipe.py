"""A merge recipe: a method with its parameters at one α (depth schedule included) and an optional repair step
(`refusal_ablation`, `answer_alignment` or `calibration`, with its parameters) — what a search trial tries and what
`merge_spec.json` records (torch-free)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..jobspec import RepairSpec
from ..methods.catalog import (
    AnswerAlignmentParams,
    CalibrationParams,
    CommonParams,
    DensityParams,
    RefusalAblationParams,
    SSTParams,
    method_info,
    parse_params,
)


class Recipe(BaseModel):
    """`method` with `params` (a single α in `alphas`) and, when set, `repair` applied to the merged model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    repair: RepairSpec | None = None

    @model_validator(mode="after")
    def _valid(self) -> Recipe:
        method_info(self.method)
        if len(self.method_params().alphas) != 1:
            raise ValueError("a recipe has exactly one α")
        return self

    def method_params(self) -> CommonParams:
        return parse_params(self.method, self.params)

    @property
    def alpha(self) -> float:
        return self.method_params().alphas[0]

    def label(self) -> str:
        """A short human-readable name: `sst(soft β=1)@1.2 linear γ=0.4 +ablation(ℓ=12 c=0.8 λ=1)`."""
        p = self.method_params()
        knobs = []
        if isinstance(p, SSTParams):
            knobs.append(f"soft β={p.beta:.3g}" if p.selection == "soft" else f"{p.selection} k={p.k}")
        if isinstance(p, DensityParams):
            knobs.append(f"density={p.density:.2g}")
        name = self.method + (f"({', '.join(knobs)})" if knobs else "")
        text = f"{name}@{self.alpha:.3g}"
        if p.schedule == "linear":
            text += f" linear γ={p.schedule_gamma:+.3g}"
        elif p.schedule == "groups":
            text += " groups " + "/".join(f"{g:.2g}" for g in p.schedule_groups or [])
            if p.schedule_mlp_groups:
                text += " mlp " + "/".join(f"{g:.2g}" for g in p.schedule_mlp_groups)
        if self.repair is not None:
            text += " +" + repair_label(self.repair.step_params())
        return text


def repair_label(params: object) -> str:
    """The repair step and its searched knobs: `ablation(ℓ=12 c=0.8 λ=1)`, `alignment(ℓ=9 c=0.5)`,
    `calibration(r=8 steps=100 lr=0.0002 w_P=1)`."""
    if isinstance(params, RefusalAblationParams):
        where = f"ℓ={params.layer}" if params.layer is not None else "ℓ=auto"
        return f"ablation({where} c={params.strength:.2g} λ={params.lam:.2g})"
    if isinstance(params, AnswerAlignmentParams):
        where = "ℓ=" + ("/".join(map(str, params.layers)) if params.layers else "auto")
        return f"alignment({where} c={params.strength:.2g})"
    assert isinstance(params, CalibrationParams), params
    return (
        f"calibration(r={params.rank} steps={params.steps} lr={params.learning_rate:.2g} "
        f"w_P={params.borderline_weight:.2g})"
    )
