"""The catalogue of merge methods: one torch-free declaration per method (mergekit's `@merge_method`).

Each method's name, parameter model (pydantic), description, reference and whether it reads data
(`needs_fisher`) stand together on its parameter class; the implementation is attached by name with
`sstmerge_core.methods.base.implements`. The API validates requests and serves `GET /methods` from
this module without importing torch; the CLI flags and the model card read it too.

A method's parameters are its own fields plus the common ones (α sweep, rank cap, seed, data limits);
unknown keys are an error, never ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..schedules import SCALE_BOUND, ScheduleParams

SEED_BOUND = 2**31  # seeds are stored and passed on as 32-bit integers
MAX_RANK = 1 << 16
Alpha = Annotated[float, Field(ge=-SCALE_BOUND, le=SCALE_BOUND)]


class CommonParams(ScheduleParams):
    """Parameters every method takes (the depth schedule of α included). Every number has a range; NaN and
    ±inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alphas: list[Alpha] = Field(
        default=[1.0],
        min_length=1,
        max_length=64,
        description="weight(s) α of the safety side, each within ±100; a list is a sweep",
    )
    max_rank: int | None = Field(
        default=None, ge=1, le=MAX_RANK, description="truncate each merged module to this rank by SVD"
    )
    seed: int = Field(default=0, ge=0, lt=SEED_BOUND, description="seed for sampling (sampled Fisher, DARE)")

    @field_validator("alphas")
    @classmethod
    def _finite(cls, alphas: list[float]) -> list[float]:
        for alpha in alphas:
            if not math.isfinite(alpha):
                raise ValueError(f"α must be finite, got {alpha}")
        if len(set(alphas)) != len(alphas):
            raise ValueError("α values must be distinct")
        return alphas


class FisherParams(CommonParams):
    """Data-pass settings (only methods that read data)."""

    max_samples: int = Field(default=1000, ge=1, le=100_000, description="examples used per dataset")
    max_length: int = Field(default=512, ge=8, le=32_768, description="tokens per example (prompt + response)")
    batch_size: int = Field(default=8, ge=1, le=1024, description="examples per forward/backward pass")
    damping: float = Field(default=1e-3, gt=0, le=1e3, description="ε: Ã = A + ε·tr(A)/r·I")
    continuation_tokens: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="tokens the model writes for prompts without a response (sampled Fisher)",
    )
    label_samples: int = Field(default=1, ge=1, le=64, description="label draws per position for the sampled Fisher")


@dataclass(frozen=True)
class MethodInfo:
    """Everything known about a method without running it."""

    name: str
    params: type[CommonParams]
    description: str
    reference: str
    needs_fisher: bool = False
    dense: bool = False  # works on the dense ΔW of each module (cost ∝ d_out·d_in·min(d_out, d_in) per α)

    def params_schema(self) -> dict[str, Any]:
        """The JSON Schema of the method's `params` (what `GET /methods` serves)."""
        return self.params.model_json_schema()


CATALOG: dict[str, MethodInfo] = {}
P = TypeVar("P", bound=type[CommonParams])


def method(
    name: str, *, description: str, reference: str, needs_fisher: bool = False, dense: bool = False
) -> Callable[[P], P]:
    """Declare the decorated parameter class as the parameters of method `name`."""

    def declare(params: P) -> P:
        if name in CATALOG:
            raise ValueError(f"method {name!r} is declared twice")
        CATALOG[name] = MethodInfo(name, params, description, reference, needs_fisher, dense)
        return params

    return declare


@method(
    "sst",
    description=(
        "SST-Merge: project the safety update onto generalized eigendirections of (F_safety, F_utility) "
        "(K-FAC, restricted to the safety update's span) and add α times the weighted projection."
    ),
    reference="docs/method.md (generalized eigenproblem F_S v = λ F_U v; soft Fisher-merging weights λ/(λ+β))",
    needs_fisher=True,
)
class SSTParams(FisherParams):
    selection: Literal["soft", "topk", "input"] = Field(default="soft", description="how directions are weighted")
    beta: float = Field(default=1.0, ge=0, le=1e6, description="soft: W = λ/(λ+β·median λ)")
    k: int = Field(default=10, ge=1, le=1 << 20, description="topk: number of (i, j) directions kept per module")
    k_in: int = Field(default=8, ge=1, le=MAX_RANK, description="input: number of input directions kept per module")
    utility_fisher: Literal["sampled", "empirical"] = Field(default="sampled", description="estimator on utility data")
    safety_fisher: Literal["empirical", "sampled"] = Field(default="empirical", description="estimator on safety data")


@method(
    "linear",
    description="Task arithmetic: the weighted sum of the utility updates plus α times the safety update.",
    reference="https://arxiv.org/abs/2212.04089",
)
class LinearParams(CommonParams):
    pass


class DensityParams(CommonParams):
    density: float = Field(default=0.5, gt=0, le=1, description="fraction of entries kept per task update")


class TiesParams(DensityParams):
    majority_sign_method: Literal["total", "frequency"] = Field(default="total", description="TIES sign election")


@method(
    "ties",
    description="TIES: trim each update to its top-density magnitudes, elect signs, average the agreeing entries.",
    reference="https://arxiv.org/abs/2306.01708",
    dense=True,
)
class TiesMethodParams(TiesParams):
    pass


@method(
    "dare_linear",
    description="DARE: drop entries at random with rate 1−density, rescale by 1/density, then sum (seeded).",
    reference="https://arxiv.org/abs/2311.03099",
    dense=True,
)
class DareLinearParams(DensityParams):
    pass


@method(
    "dare_ties",
    description="DARE drop-and-rescale followed by TIES sign election (seeded).",
    reference="https://arxiv.org/abs/2311.03099",
    dense=True,
)
class DareTiesParams(TiesParams):
    pass


@method(
    "magnitude_prune",
    description="Keep the top-density magnitudes of each update, then sum.",
    reference="https://arxiv.org/abs/2306.01708",
    dense=True,
)
class MagnitudePruneParams(DensityParams):
    pass


METHOD_PARAMS: dict[str, type[CommonParams]] = {name: info.params for name, info in CATALOG.items()}


def method_info(name: str) -> MethodInfo:
    """The declaration of method `name`; KeyError naming the known methods otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; one of {sorted(CATALOG)}") from None


def parse_params(method: str, params: dict) -> CommonParams:
    """Validate `params` for `method`; raises KeyError for an unknown method, pydantic's error otherwise."""
    return method_info(method).params.model_validate(params)


REPAIR_DATA = ("safety_data", "harmless_data", "borderline_data")


@dataclass(frozen=True)
class RepairInfo:
    """A post-merge repair step: it changes a merged model, whatever method made it."""

    name: str
    params: type[BaseModel]
    description: str
    reference: str
    needs: tuple[str, ...] = REPAIR_DATA  # the job's data inputs the step cannot run without
    reads: tuple[str, ...] = ()  # further data inputs it reads when given

    def params_schema(self) -> dict[str, Any]:
        return self.params.model_json_schema()

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every data input the step reads: what it needs, then what it reads when given."""
        return self.needs + self.reads


REPAIRS: dict[str, RepairInfo] = {}
R = TypeVar("R", bound=type[BaseModel])
MAX_POSITIONS = 16


def repair_step(
    name: str, *, description: str, reference: str, needs: tuple[str, ...] = REPAIR_DATA, reads: tuple[str, ...] = ()
) -> Callable[[R], R]:
    """Declare the decorated parameter class as the parameters of repair step `name`, which cannot run without the
    job's data inputs `needs` (MergeSpec field names) and also reads `reads` when they are given."""

    def declare(params: R) -> R:
        if name in REPAIRS:
            raise ValueError(f"repair step {name!r} is declared twice")
        REPAIRS[name] = RepairInfo(name, params, description, reference, needs, reads)
        return params

    return declare


def parse_repair(name: str, params: dict) -> BaseModel:
    """Validate `params` for repair step `name`; KeyError naming the known steps, pydantic's error otherwise."""
    if name not in REPAIRS:
        raise KeyError(f"unknown repair step {name!r}; one of {sorted(REPAIRS)}")
    return REPAIRS[name].params.model_validate(params)


@repair_step(
    "refusal_ablation",
    description=(
        "Ablate the false-refusal direction (borderline − harmless mean activations, orthogonalized against the "
        "true refusal direction) from every residual-stream writer of the merged model, as rank-1 LoRA factors."
    ),
    reference="https://arxiv.org/abs/2410.03415 (docs/repair.md)",
)
class RefusalAblationParams(BaseModel):
    """Ablate the false-refusal direction v̂ (λ-orthogonalized against the true refusal direction) with strength c
    from every residual-stream writer of the merged model (docs/repair.md)."""

    model_config = ConfigDict(extra="forbid")

    lam: float = Field(default=1.0, ge=0, le=1, description="λ: v′ = v − λ (v·r/‖r‖²) r (1: v̂ ⟂ r)")
    strength: float = Field(default=1.0, ge=0, le=1, description="c: W_eff ← (I − c v̂v̂ᵀ) W_eff (1: full ablation)")
    layer: int | None = Field(default=None, ge=0, le=4096, description="take v̂ at this layer (default: selected)")
    position: int | None = Field(
        default=None,
        ge=-MAX_POSITIONS,
        le=-1,
        description="take v̂ at this post-instruction token, counted from the end (-1: last; default: selected)",
    )
    layer_stride: int = Field(
        default=1, ge=1, le=64, description="candidate layers are every this-many-th layer (cheaper selection)"
    )
    max_layer_fraction: float = Field(
        default=0.8, gt=0, le=1, description="candidate layers ℓ < this fraction of L (the last layers are skipped)"
    )
    kl_threshold: float = Field(
        default=0.1, gt=0, le=100, description="drop a candidate whose ablation moves harmless next-token KL above this"
    )
    harmful_margin: float = Field(
        default=1.0, ge=0, le=100, description="keep a candidate only if harmful refusal log-odds fall by at most this"
    )
    include_embedding: bool = Field(default=True, description="also ablate v̂ from the token embedding")
    max_samples: int = Field(
        default=128, ge=4, le=10_000, description="prompts used per set (harmful, harmless, borderline)"
    )
    batch_size: int = Field(default=16, ge=1, le=1024, description="prompts per forward pass")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seed of the subsample and the fit/select split")


@repair_step(
    "answer_alignment",
    description=(
        "Make answering follow a harmfulness probe: per chosen layer, fit a benign probe (harmful vs harmless and "
        "borderline) and an answer probe (refused vs answered) on the merged model's residual stream, and add to the "
        "layer's MLP output projection the minimum-norm rank-1 update that sets the answer score to a target "
        "following the benign score (ridge least squares), as rank-1 LoRA factors."
    ),
    reference="after LLM-VA, https://arxiv.org/abs/2601.19487 (docs/repair.md)",
)
class AnswerAlignmentParams(BaseModel):
    """ΔW = c v̂_a uᵀ on the MLP output projection of each chosen layer ℓ, u the ridge least-squares solution of
    s_a(h + v̂_a uᵀx) = τ(s_b(h)) on the fitting prompts (docs/repair.md)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    strength: float = Field(default=1.0, ge=0, le=1, description="c: ΔW = c v̂_a uᵀ (0: no change, 1: meet the targets)")
    ridge: float = Field(
        default=0.01, ge=0, le=1e3, description="ρ/mean‖x‖²: u = argmin Σ(uᵀx_i − r_i)² + ρ‖u‖² (0: pseudo-inverse)"
    )
    layers: list[Annotated[int, Field(ge=0, le=4096)]] | None = Field(
        default=None, min_length=1, max_length=64, description="edit these layers (default: selected by probe accuracy)"
    )
    num_layers: int = Field(default=1, ge=1, le=64, description="how many layers are selected when `layers` is unset")
    layer_stride: int = Field(default=1, ge=1, le=64, description="candidate layers are every this-many-th layer")
    max_layer_fraction: float = Field(
        default=0.8, gt=0, le=1, description="candidate layers ℓ < this fraction of L (the last layers are skipped)"
    )
    targets: Literal["benign_score", "benign_sign"] = Field(
        default="benign_score",
        description="answer-score target τ: clip(s_b, −m, m) (`benign_score`) or m·sign(s_b) (`benign_sign`)",
    )
    margin: float = Field(default=4.0, gt=0, le=50, description="m: the bound (or size) of the target log-odds τ")
    refusal_threshold: float = Field(
        default=0.0,
        ge=-50,
        le=50,
        description="a prompt counts as refused when its first-token refusal log-odds exceed this (0: p_R > 1/2)",
    )
    probe_c: float = Field(
        default=1.0, gt=0, le=1e6, description="C of the logistic probes (inverse L2 strength, on standardized inputs)"
    )
    max_samples: int = Field(
        default=128, ge=4, le=10_000, description="prompts used per set (harmful, harmless, borderline)"
    )
    batch_size: int = Field(default=16, ge=1, le=1024, description="prompts per forward pass")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seed of the subsample and the fit/held-out split")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and len(set(layers)) != len(layers):
            raise ValueError("layers must be distinct")
        return layers


@repair_step(
    "calibration",
    description=(
        "Fine-tune a new LoRA on the frozen merged model: borderline-benign prompts with the `before` model's own "
        "answers, harmful prompts with their refusals and retain rows with their answers; the trained factors are "
        "concatenated to the merged ones (ranks add)."
    ),
    reference="https://arxiv.org/abs/2410.12999 (docs/repair.md)",
    needs=("safety_data", "borderline_data"),
    reads=("utility_data", "harmless_data"),
)
class CalibrationParams(BaseModel):
    """Train ΔW_c = s·B_c A_c (rank r_c, s = 2) on the merged model W + ΔW for `steps` AdamW steps of token
    cross-entropy on targets, batches drawn from the mixture of the four sets by their weights (docs/repair.md)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rank: int = Field(
        default=8, ge=1, le=256, description="r_c: rank of the calibration LoRA (the adapter's grows by r_c)"
    )
    steps: int = Field(default=100, ge=0, le=100_000, description="optimiser steps (0: the merge is left as it is)")
    learning_rate: float = Field(
        default=2e-4, gt=0, le=1, description="AdamW peak learning rate (linear warm-up over 5 % of steps, then decay)"
    )
    batch_size: int = Field(default=8, ge=1, le=1024, description="examples per step, drawn from the mixture")
    max_target_tokens: int = Field(
        default=64, ge=1, le=4096, description="tokens of each target (and of the `before` model's answers)"
    )
    max_length: int = Field(default=512, ge=8, le=32_768, description="tokens per example (prompt + target)")
    max_samples: int = Field(
        default=512, ge=1, le=100_000, description="rows used per set (a seeded subsample of larger sets)"
    )
    borderline_weight: float = Field(
        default=1.0, gt=0, le=100, description="mixture weight of the borderline prompts P (compliant targets)"
    )
    harmful_weight: float = Field(
        default=1.0, gt=0, le=100, description="mixture weight of the harmful prompts H (the safety data's refusals)"
    )
    retain_weight: float = Field(
        default=1.0, ge=0, le=100, description="mixture weight of the retain rows (the utility data), when given"
    )
    harmless_weight: float = Field(
        default=0.5, ge=0, le=100, description="mixture weight of the harmless prompts B, when given"
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seed of the subsample, the LoRA init and the batches")
