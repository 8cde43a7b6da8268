"""PEFT LoRA adapters: loading (safetensors only), per-module updates ΔW, and writing merged adapters.

Orientation: every update is held in `nn.Linear` orientation, ΔW ∈ R^{d_out × d_in}, so that a module
maps x ↦ (W + ΔW) x. PEFT stores lora_A as (r × d_in) and lora_B as (d_out × r) for both `nn.Linear`
and GPT-2's `Conv1D` (`fan_in_fan_out=True`, whose weight is stored transposed), hence
ΔW = s · B A with s = lora_alpha / r (or lora_alpha / √r with rsLoRA) in every case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .adapter_format import WEIGHTS_NAME, adapter_sha256, lora_scale, out_of_range, read_layout
from .errors import AdapterError


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank update ΔW = scale · B A, with B (d_out × r) and A (r × d_in)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of ΔW."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """Dense ΔW = scale · B A, (d_out × d_in), in float32 or wider."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def core(self, R_out: torch.Tensor, R_in: torch.Tensor) -> torch.Tensor:
        """R_outᵀ ΔW R_in = scale · (R_outᵀ B)(A R_in), without forming ΔW."""
        B, A = self.B.to(R_out.dtype), self.A.to(R_in.dtype)
        return self.scale * (R_out.T @ B) @ (A @ R_in)

    def frobenius_norm(self) -> float:
        """‖scale · B A‖_F = |scale| · √tr((BᵀB)(AAᵀ)), without forming ΔW."""
        B, A = self.B.double(), self.A.double()
        return abs(self.scale) * float(torch.sqrt(torch.clamp(torch.trace((B.T @ B) @ (A @ A.T)), min=0)))

    def as_stored(self, dtype: torch.dtype = torch.float32) -> LoraFactors:
        """The factors as an adapter file holds them: A and s·B in `dtype` (s·B formed in float64), scale 1; no copy
        of factors that already are."""
        B = self.B if self.scale == 1 else self.scale * self.B.to(torch.float64)
        return LoraFactors(B.to(dtype).contiguous(), self.A.to(dtype).contiguous(), 1.0)

    def scaled(self, weight: float) -> LoraFactors:
        """The factors of weight · ΔW."""
        return LoraFactors(self.B, self.A, self.scale * weight)

    @staticmethod
    def concat(parts: list[LoraFactors]) -> LoraFactors:
        """Σ_i s_i B_i A_i written exactly as one LoRA: B = [s_1 B_1 | … ], A = [A_1; …], scale 1."""
        dtype = torch.float64 if any(p.A.dtype == torch.float64 for p in parts) else torch.float32
        B = torch.cat([p.scale * p.B.to(dtype) for p in parts], dim=1)
        A = torch.cat([p.A.to(dtype) for p in parts], dim=0)
        return LoraFactors(B, A, 1.0)


@dataclass
class LoraAdapter:
    """A loaded PEFT LoRA adapter: its config and the factors of every target module, by module name."""

    path: Path | None
    config: dict
    modules: dict[str, LoraFactors]
    sha256: str = ""
    name: str = ""
    embedding_modules: frozenset[str] = frozenset()

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def delta(self, module: str) -> torch.Tensor:
        return self.modules[module].delta()


def module_scale(config: dict, module: str, rank: int) -> float:
    """s_m = α_m / r_m (or α_m / √r_m with rsLoRA), honouring rank_pattern and alpha_pattern
    (`adapter_format.lora_scale`, PEFT's pattern lookup)."""
    return lora_scale(config, module, rank)


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA folder; refuses whatever `adapter_format` refuses (pickles, DoRA, trained biases, unknown
    tensor names, bad config values or safetensors offsets, …) and non-finite values. Errors name the adapter by
    `name` when given (the service's id), else by its folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    try:
        layout = read_layout(folder)
        try:
            tensors = load_file(str(folder / WEIGHTS_NAME))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{WEIGHTS_NAME}: corrupt safetensors file ({exc})") from None
        modules: dict[str, LoraFactors] = {}
        for module, entry in layout.modules.items():
            A, B = tensors[entry.a_key], tensors[entry.b_key]
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise AdapterError(f"module {module}: holds non-finite values")
            if not (torch.isfinite(A.float()).all() and torch.isfinite(B.float()).all()):
                raise out_of_range(module)
            modules[module] = LoraFactors(B=B, A=A, scale=entry.scale)
    except AdapterError as exc:
        raise AdapterError(f"{f'adapter {name}' if name else folder}: {exc}", code=exc.code) from None
    embeddings = frozenset(module for module, entry in layout.modules.items() if entry.embedding)
    return LoraAdapter(folder, layout.config, modules, adapter_sha256(folder), name or folder.name, embeddings)


def save_adapter(
    folder: str | Path,
    modules: dict[str, LoraFactors],
    *,
    base_model: str | None,
    revision: str | None = None,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
    embedding_modules: frozenset[str] = frozenset(),
) -> None:
    """Write a standard PEFT LoRA folder holding ΔW_m = B_m A_m for every m (scaling 1 everywhere).

    Modules may differ in rank: the most common rank is `r` and the others go to `rank_pattern`, with
    `lora_alpha` / `alpha_pattern` equal to the rank so that every scaling is exactly 1. Modules named in
    `embedding_modules` are written as PEFT embedding LoRA (`lora_embedding_A`/`lora_embedding_B`).
    """
    from peft import LoraConfig

    if not modules:
        raise AdapterError("refusing to write an adapter with no modules")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {name: f.rank for name, f in modules.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_common = max(counts, key=lambda r: (counts[r], r))
    pattern = {re.escape(name): r for name, r in ranks.items() if r != r_common}
    config = LoraConfig(
        r=r_common,
        lora_alpha=r_common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(modules),
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        revision=revision,
    )
    config.save_pretrained(str(folder))
    tensors: dict[str, torch.Tensor] = {}
    for name, f in modules.items():
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if name in embedding_modules
            else ("lora_A.weight", "lora_B.weight")
        )
        stored = f.as_stored(dtype)
        tensors[f"base_model.model.{name}.{a_key}"] = stored.A
        tensors[f"base_model.model.{name}.{b_key}"] = stored.B
    # safetensors' save_file creates the file 0600; written through open() it gets 0666 less the umask like the
    # config and every other file of the folder
    (folder / WEIGHTS_NAME).write_bytes(save(tensors, metadata={"format": "pt"}))
