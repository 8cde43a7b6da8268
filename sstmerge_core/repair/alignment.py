"""The linear algebra of answer alignment, as pure functions (docs/repair.md, after LLM-VA, arXiv 2601.19487).

At one layer ℓ, h is the residual stream leaving the layer at the last prompt token and x the input of the layer's
MLP output projection W_eff (d × d_in), the last writer of h. Two logistic probes give log-odds scores
    s_b(h) = w_bᵀh + b_b  (benign: harmless or borderline vs harmful),
    s_a(h) = w_aᵀh + b_a  (answer: the merged model answers vs refuses),
with the answer direction v̂_a = w_a/‖w_a‖. The edit W_eff′ = W_eff + c v̂_a uᵀ moves h to h + c v̂_a (uᵀx), so
s_a(h′) = s_a(h) + c‖w_a‖ uᵀx. With the targets τ_i = clip(s_b(h_i), −m, m) (or m·sign s_b(h_i)) and
r_i = (τ_i − s_a(h_i))/‖w_a‖, u is the ridge least-squares solution
    u = argmin_u Σ_i (uᵀx_i − r_i)² + ρ‖u‖² = V diag(σ/(σ² + ρ)) Uᵀ r   (X = U diag(σ) Vᵀ, rows x_i),
which lies in the row space of X (ρ = 0: u = X⁺r, the minimum-norm least-squares solution), so c v̂_a uᵀ is the
minimum-Frobenius-norm update that changes the answer scores of the fitting prompts by c‖w_a‖ Xu.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..adapters import LoraFactors

Targets = Literal["benign_score", "benign_sign"]


@dataclass(frozen=True)
class LinearProbe:
    """s(h) = wᵀh + b, a logistic probe's decision function (log-odds of the positive class) on raw activations."""

    weight: torch.Tensor  # (d,), float64
    bias: float

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """s(h) for every row of h (…, d), in float64."""
        return h.double() @ self.weight + self.bias

    @property
    def norm(self) -> float:
        return float(self.weight.norm())

    @property
    def direction(self) -> torch.Tensor:
        """v̂ = w/‖w‖."""
        return self.weight / self.weight.norm().clamp_min(torch.finfo(torch.float64).tiny)


def fit_probe(h: torch.Tensor, positive: torch.Tensor, c: float) -> LinearProbe:
    """Class-balanced L2 logistic regression (scikit-learn, C = `c`) of `positive` (N, bool) on standardized h (N × d),
    returned in raw coordinates: w = coef/σ, b = intercept − wᵀμ. Both classes must occur."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = h.double().cpu().numpy()
    y = positive.cpu().numpy().astype(np.int64)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=10_000))
    pipeline.fit(X, y)
    scaler, logistic = pipeline[0], pipeline[1]
    weight = logistic.coef_[0] / scaler.scale_
    bias = float(logistic.intercept_[0] - weight @ scaler.mean_)
    return LinearProbe(torch.from_numpy(weight.astype(np.float64)), bias)


def balanced_accuracy(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Mean over the classes present of the fraction with the right sign (s > 0 ⇔ positive); None without rows."""
    if score.numel() == 0:
        return None
    predicted = score > 0
    recalls = [
        float((predicted[positive == cls] == cls).double().mean()) for cls in (True, False) if (positive == cls).any()
    ]
    return sum(recalls) / len(recalls)


def answer_targets(benign_score: torch.Tensor, kind: Targets, margin: float) -> torch.Tensor:
    """τ: the answer log-odds each prompt should get, clip(s_b, −m, m) or m·sign(s_b) (s_b = 0 counts as benign)."""
    if kind == "benign_score":
        return benign_score.double().clamp(-margin, margin)
    return torch.where(benign_score >= 0, margin, -margin).double()


def ridge_solution(x: torch.Tensor, r: torch.Tensor, ridge: float) -> torch.Tensor:
    """u = argmin ‖Xu − r‖² + ρ‖u‖² with ρ = ridge · mean_i ‖x_i‖², for X (n × d_in) and r (n), by the SVD of X
    (singular values below the rank tolerance dropped, so ridge = 0 gives X⁺r); u lies in the row space of X."""
    X, target = x.double(), r.double().reshape(-1)
    U, sigma, Vh = torch.linalg.svd(X, full_matrices=False)
    rho = ridge * float((X * X).sum(dim=1).mean())
    tolerance = float(sigma.max()) * max(X.shape) * torch.finfo(torch.float64).eps if sigma.numel() else 0.0
    gain = torch.where(sigma > tolerance, sigma / (sigma * sigma + rho), torch.zeros_like(sigma))
    return Vh.T @ (gain * (U.T @ target))


def required_shift(answer: LinearProbe, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """r_i = (τ_i − s_a(h_i))/‖w_a‖: what uᵀx_i must be for s_a(h_i + v̂_a uᵀx_i) = τ_i."""
    return (targets.double() - answer.score(h)) / answer.norm


def alignment_factors(direction: torch.Tensor, u: torch.Tensor, strength: float) -> LoraFactors:
    """The rank-1 LoRA of ΔW = c v̂_a uᵀ (d × d_in): B = c v̂_a (d × 1), A = uᵀ (1 × d_in), in float64."""
    return LoraFactors(B=strength * direction.double().reshape(-1, 1), A=u.double().reshape(1, -1))
