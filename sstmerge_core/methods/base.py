"""What a merge method sees of one module, what it returns, and how an implementation joins its declaration.

Every method is a pure function `merge(inputs, params, alphas) -> [ModuleResult per α]` on one module's
updates, in the manner of mergekit's merge methods, attached with `@implements(name)` to the torch-free
declaration of the same name in `catalog`; the CLI, API schema and model card read the declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch

from ..adapters import LoraFactors
from .catalog import CommonParams, MethodInfo, method_info


@dataclass(frozen=True)
class FisherFactors:
    """Restricted K-FAC factors of one module at the utility-merged model (docs/method.md, step 3)."""

    R_in: torch.Tensor  # (d_in × q) orthonormal basis of row(A_S)
    R_out: torch.Tensor  # (d_out × p) orthonormal basis of col(B_S)
    A_u: torch.Tensor  # (q × q)
    G_u: torch.Tensor  # (p × p)
    A_s: torch.Tensor  # (q × q)
    G_s: torch.Tensor  # (p × p)


@dataclass(frozen=True)
class ModuleInputs:
    """One module's updates: the utility ones ΔU_i with their weights w_i (default 1), and the safety
    sum ΔS = Σ_j w_j ΔS_j whose weight is α."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    utility: list[LoraFactors]
    safety: LoraFactors | None
    fisher: FisherFactors | None = None
    utility_weights: tuple[float, ...] = ()

    @property
    def weights(self) -> list[float]:
        return list(self.utility_weights) or [1.0] * len(self.utility)

    def weighted_utility(self) -> list[LoraFactors]:
        """[w_i ΔU_i] as factors."""
        return [part.scaled(w) for part, w in zip(self.utility, self.weights, strict=True)]

    def utility_delta(self) -> torch.Tensor:
        """Dense ΔU = Σ_i w_i ΔU_i (zeros if no utility adapter touches the module)."""
        delta = torch.zeros(self.shape, dtype=torch.float64)
        for part in self.weighted_utility():
            delta += part.delta().to(torch.float64)
        return delta


@dataclass(frozen=True)
class ModuleResult:
    """The merged update ΔW = B A (scale 1) of one module at one α, or None if ΔW = 0."""

    factors: LoraFactors | None
    diagnostics: dict = field(default_factory=dict)


MergeFn = Callable[[ModuleInputs, CommonParams, list[float]], list[ModuleResult]]


@dataclass(frozen=True)
class MergeMethod:
    """A declared method (`info`) with its implementation."""

    info: MethodInfo
    merge: MergeFn

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def needs_fisher(self) -> bool:
        return self.info.needs_fisher

    @property
    def params(self) -> type[CommonParams]:
        return self.info.params


IMPLEMENTATIONS: dict[str, MergeMethod] = {}


#: A merge function taking the params model of its own method (a subclass of `CommonParams`).
F = TypeVar("F", bound=Callable[..., list[ModuleResult]])


def implements(name: str) -> Callable[[F], F]:
    """Attach the decorated function as the implementation of the declared method `name`."""

    def attach(merge: F) -> F:
        if name in IMPLEMENTATIONS:
            raise ValueError(f"method {name!r} is implemented twice")
        # it is only ever called with params of `method_info(name).params`, the type its signature names
        IMPLEMENTATIONS[name] = MergeMethod(method_info(name), cast(MergeFn, merge))
        return merge

    return attach


def concat_update(utility: list[LoraFactors], safety: LoraFactors | None, alpha: float) -> LoraFactors | None:
    """ΔU + α ΔS written exactly as one concatenated LoRA (the safety part dropped when α = 0)."""
    parts = list(utility)
    if safety is not None and alpha != 0 and safety.rank > 0:
        parts.append(safety.scaled(alpha))
    return LoraFactors.concat(parts) if parts else None
