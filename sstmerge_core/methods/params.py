"""Parameters of every merge method, as pydantic models (no torch import: the API validates with these).

A method's parameters are its own fields plus the common ones (α sweep, rank cap, seed, data limits);
unknown keys are an error, never ignored.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CommonParams(BaseModel):
    """Parameters every method takes."""

    model_config = ConfigDict(extra="forbid")

    alphas: list[float] = Field(
        default=[1.0], min_length=1, description="weight(s) α of the safety side; a list is a sweep"
    )
    max_rank: int | None = Field(default=None, ge=1, description="truncate each merged module to this rank by SVD")
    seed: int = Field(default=0, description="seed for sampling (sampled Fisher, DARE)")

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

    max_samples: int = Field(default=1000, ge=1, description="examples used per dataset")
    max_length: int = Field(default=512, ge=8, description="tokens per example (prompt + response)")
    batch_size: int = Field(default=8, ge=1, description="examples per forward/backward pass")
    damping: float = Field(default=1e-3, gt=0, description="ε: Ã = A + ε·tr(A)/r·I")
    continuation_tokens: int = Field(
        default=32, ge=1, description="tokens the model writes for prompts without a response (sampled Fisher)"
    )
    label_samples: int = Field(default=1, ge=1, description="label draws per position for the sampled Fisher")


class SSTParams(FisherParams):
    selection: Literal["soft", "topk", "input"] = Field(default="soft", description="how directions are weighted")
    beta: float = Field(default=1.0, ge=0, description="soft: W = λ/(λ+β·median λ)")
    k: int = Field(default=10, ge=1, description="topk: number of (i, j) directions kept per module")
    k_in: int = Field(default=8, ge=1, description="input: number of input directions kept per module")
    utility_fisher: Literal["sampled", "empirical"] = Field(default="sampled", description="estimator on utility data")
    safety_fisher: Literal["empirical", "sampled"] = Field(default="empirical", description="estimator on safety data")


class LinearParams(CommonParams):
    pass


class DensityParams(CommonParams):
    density: float = Field(default=0.5, gt=0, le=1, description="fraction of entries kept per task update")


class TiesParams(DensityParams):
    majority_sign_method: Literal["total", "frequency"] = Field(default="total", description="TIES sign election")


METHOD_PARAMS: dict[str, type[CommonParams]] = {
    "sst": SSTParams,
    "linear": LinearParams,
    "ties": TiesParams,
    "dare_linear": DensityParams,
    "dare_ties": TiesParams,
    "magnitude_prune": DensityParams,
}


def parse_params(method: str, params: dict) -> CommonParams:
    """Validate `params` for `method`; raises KeyError for an unknown method, pydantic's error otherwise."""
    return METHOD_PARAMS[method].model_validate(params)
