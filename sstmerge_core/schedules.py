"""Depth schedules: how much of the safety update each layer gets (torch-free; declared on every method).

For a model of L decoder layers and a module in layer ℓ ∈ {1, …, L}, the merged update is
ΔW_ℓ = ΔU_ℓ + α_ℓ ΔS′_ℓ, where ΔS′ is whatever the method makes of the safety update (linear: ΔS; SST: the
projected update) and

- `constant`: α_ℓ = α;
- `linear`:   α_ℓ = α + γ (ℓ − 1)/(L − 1)  (LiNeS, arXiv 2410.17146: scale a task vector linearly in depth);
- `groups`:   α_ℓ = α · g_k for the k-th of G consecutive, equal groups of layers (k = ⌊(ℓ − 1) G / L⌋);
  MLP modules may take their own scales h_k (`schedule_mlp_groups`), attention modules keep g_k.

Modules outside the decoder layers (no layer index in their name) keep α. A schedule only rescales whole
per-module updates, so every merge stays exact and loads with PEFT like any other.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

ScheduleKind = Literal["constant", "linear", "groups"]
ModuleKind = Literal["attention", "mlp"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ATTENTION = {"self_attn", "attn", "attention", "self_attention"}
_MLP = {"mlp", "ffn", "feed_forward", "block_sparse_moe"}
SCALE_BOUND = 100.0


def layer_index(module: str) -> int | None:
    """0-based decoder layer of a module name (`model.layers.12.mlp.down_proj` → 12), None outside the layers."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def module_kind(module: str) -> ModuleKind | None:
    """`attention` or `mlp` by the module's path (`self_attn`, `attn`, `mlp`, …), None when neither."""
    parts = set(module.split("."))
    if parts & _ATTENTION:
        return "attention"
    if parts & _MLP:
        return "mlp"
    return None


class ScheduleParams(BaseModel):
    """The depth schedule of the safety update (see the module docstring for α_ℓ)."""

    schedule: ScheduleKind = Field(default="constant", description="depth schedule of α: constant, linear or groups")
    schedule_gamma: float = Field(
        default=0.0, ge=-SCALE_BOUND, le=SCALE_BOUND, description="linear: α_ℓ = α + γ·(ℓ−1)/(L−1)"
    )
    schedule_groups: list[float] | None = Field(
        default=None, min_length=1, max_length=64, description="groups: α_ℓ = α·g_k over G equal groups of layers"
    )
    schedule_mlp_groups: list[float] | None = Field(
        default=None, min_length=1, max_length=64, description="groups: scales of MLP modules (default: the same g_k)"
    )

    @field_validator("schedule_groups", "schedule_mlp_groups")
    @classmethod
    def _bounded(cls, values: list[float] | None) -> list[float] | None:
        for value in values or []:
            if not math.isfinite(value) or abs(value) > SCALE_BOUND:
                raise ValueError(f"group scales must be finite and within ±{SCALE_BOUND:g}, got {value}")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleParams:
        if self.schedule == "groups" and not self.schedule_groups:
            raise ValueError("schedule 'groups' needs schedule_groups (one scale per group of layers)")
        if self.schedule != "groups" and (self.schedule_groups or self.schedule_mlp_groups):
            raise ValueError("schedule_groups / schedule_mlp_groups apply only to schedule 'groups'")
        if self.schedule != "linear" and self.schedule_gamma != 0:
            raise ValueError("schedule_gamma applies only to schedule 'linear'")
        return self

    def module_alpha(self, alpha: float, module: str, num_layers: int) -> float:
        """α_ℓ of `module` for the sweep value α in a model of `num_layers` decoder layers."""
        layer = layer_index(module)
        if self.schedule == "constant" or layer is None:
            return alpha
        if not 0 <= layer < num_layers:
            raise ValueError(f"module {module}: layer {layer} outside a model of {num_layers} layers")
        if self.schedule == "linear":
            return alpha + self.schedule_gamma * (layer / (num_layers - 1) if num_layers > 1 else 0.0)
        scales = self.schedule_groups or []
        if module_kind(module) == "mlp" and self.schedule_mlp_groups:
            scales = self.schedule_mlp_groups
        return alpha * scales[layer * len(scales) // num_layers]

    def layer_alphas(self, alpha: float, num_layers: int) -> dict[str, list[float]]:
        """α_ℓ per layer for attention and MLP modules, for reports: {"attention": [...], "mlp": [...]}."""
        return {
            kind: [self.module_alpha(alpha, f"model.layers.{i}.{name}.x", num_layers) for i in range(num_layers)]
            for kind, name in (("attention", "self_attn"), ("mlp", "mlp"))
        }
