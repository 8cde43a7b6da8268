"""Parameters of the `refusal_ablation` repair step (torch-free: the API validates with them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_POSITIONS = 16


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
