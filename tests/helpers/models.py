"""Tiny-model pieces shared by tests: the Llama modules the Fisher tests collect factors for, and the model loaded
with fixed random orthonormal bases on those modules (input side rank 3, output side rank 2)."""

from __future__ import annotations

from pathlib import Path

import torch

from sstmerge_core.gevp import orthonormal_basis
from sstmerge_core.modeling import linear_shape, load_base_model

#: one attention input projection, one MLP output projection and one attention value projection, over both layers
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


def load_with_bases(model_dir: Path, modules: list[str] = MODULES, seed: int = 0):
    """(model, tokenizer, bases): the base model in float32 on the CPU and, for each module, an orthonormal
    (d_in × 3, d_out × 2) pair of bases drawn from a generator seeded with `seed`."""
    model, tokenizer = load_base_model(str(model_dir), "cpu", "float32")
    g = torch.Generator().manual_seed(seed)
    bases = {}
    for name in modules:
        d_out, d_in = linear_shape(model.get_submodule(name))
        bases[name] = (
            orthonormal_basis(torch.randn(d_in, 3, generator=g)).float(),
            orthonormal_basis(torch.randn(d_out, 2, generator=g)).float(),
        )
    return model, tokenizer, bases
