"""The linear algebra of refusal-direction ablation, as pure tensor functions (docs/repair.md).

With μ_H, μ_B, μ_P the mean residual-stream activations of harmful, harmless and pseudo-harmful
(borderline-benign) prompts at one layer and token position:
    r = μ_H − μ_B (true refusal),  v = μ_P − μ_B (false refusal),
    v′ = v − λ (v·r / ‖r‖²) r,  v̂ = v′ / ‖v′‖   (λ = 1: v̂ ⟂ r).
Ablating v̂ with strength c from everything that writes into the residual stream replaces each writer's
output y by (I − c v̂v̂ᵀ) y, i.e. its weight W_eff (d_model × d_in) by (I − c v̂v̂ᵀ) W_eff, a rank-1 update
ΔW = B A with B = −c v̂ (d_model × 1) and A = v̂ᵀ W_eff (1 × d_in).
"""

from __future__ import annotations

import torch

from ..adapters import LoraFactors


def partial_orthogonalization(v: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """v̂ = v′/‖v′‖ with v′ = v − λ (v·r/‖r‖²) r, over the last dimension (any leading batch shape)."""
    r_norm2 = (r * r).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    v_prime = v - lam * (v * r).sum(dim=-1, keepdim=True) / r_norm2 * r
    return v_prime / v_prime.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def false_refusal_directions(
    mu_harmful: torch.Tensor, mu_harmless: torch.Tensor, mu_borderline: torch.Tensor, lam: float
) -> torch.Tensor:
    """v̂ for every (…, d) slice of the three means: v = μ_P − μ_B orthogonalized against r = μ_H − μ_B."""
    return partial_orthogonalization(mu_borderline - mu_harmless, mu_harmful - mu_harmless, lam)


def project_out(h: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """(I − c v̂v̂ᵀ) h for h (…, d) and a unit v̂ (d)."""
    v = direction.to(h.dtype)
    return h - strength * (h @ v).unsqueeze(-1) * v


def ablation_factors(writer: torch.Tensor, direction: torch.Tensor, strength: float) -> LoraFactors:
    """The rank-1 LoRA of ΔW = −c v̂ (v̂ᵀ W_eff) for a writer weight W_eff (d_model × d_in), in float64."""
    v = direction.to(torch.float64).reshape(-1, 1)
    return LoraFactors(B=-strength * v, A=v.T @ writer.to(torch.float64))


def refusal_log_odds(logits: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """log(p_R / (1 − p_R)) per row of `logits` (…, V), p_R = Σ_{t∈R} softmax(logits)_t (stable, no softmax)."""
    logits = logits.float()
    is_refusal = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    is_refusal[refusal_ids.to(logits.device)] = True
    refusal = torch.logsumexp(logits[..., is_refusal], dim=-1)
    other = torch.logsumexp(logits[..., ~is_refusal], dim=-1)
    return refusal - other


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) per row, with p = softmax(logits), in float32."""
    log_p_ref = torch.log_softmax(reference_logits.float(), dim=-1)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return (log_p_ref.exp() * (log_p_ref - log_p)).sum(dim=-1)
