"""Model plumbing for answer alignment: each decoder layer's MLP output projection (the last writer of the residual
stream leaving the layer), and, at the last prompt token, the residual stream leaving chosen layers, those
projections' inputs and the first-token refusal log-odds, read by forward hooks in one pass per batch.

Prompts are encoded, padded and positioned as in `residual` (the chat template, left padding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ModelError
from .directions import refusal_log_odds
from .residual import _batches, residual_writers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The MLP output projection of each decoder layer: Llama / Mistral / Qwen2 and GPT-2 layouts.
MLP_WRITER_SUFFIXES = ("mlp.down_proj", "mlp.c_proj")


def mlp_writers(model: PreTrainedModel) -> dict[int, str]:
    """Layer index ℓ → the name of layer ℓ's MLP output projection (`model.layers.ℓ.mlp.down_proj`, …)."""
    names = [name for name in residual_writers(model, include_embedding=False) if name.endswith(MLP_WRITER_SUFFIXES)]
    by_layer: dict[int, str] = {}
    for name in names:
        index = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if index is None or index in by_layer:
            raise ModelError(f"cannot tell the decoder layer of {name}; answer alignment supports Llama-like and GPT-2")
        by_layer[index] = name
    return dict(sorted(by_layer.items()))


def decoder_layer(model: PreTrainedModel, writer: str) -> nn.Module:
    """The decoder layer holding MLP writer `writer` (its name without the `.mlp.<proj>` suffix)."""
    return model.get_submodule(writer.rsplit(".", 2)[0])


@dataclass(frozen=True)
class LastToken:
    """At the last prompt token of N prompts: per layer the residual stream leaving it (N × d) and, when read, its
    MLP output projection's input (N × d_in), float64 on the CPU; and the refusal log-odds (N)."""

    residual: dict[int, torch.Tensor]
    writer_inputs: dict[int, torch.Tensor]
    refusal: torch.Tensor


@torch.no_grad()
def last_token_activations(
    model: PreTrainedModel,
    tokenizer,
    prompts: Sequence[str],
    layers: Iterable[int],
    refusal_ids: torch.Tensor,
    batch_size: int,
    *,
    writer_inputs: bool = False,
) -> LastToken:
    """One forward pass per batch with hooks on the decoder layers (output) and, with `writer_inputs`, their MLP
    output projections (input); the refusal log-odds are those of the next-token logits after each prompt."""
    writers = mlp_writers(model)
    residual: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in residual} if writer_inputs else {}
    refusal: list[torch.Tensor] = []

    def keep_output(store: list[torch.Tensor]):
        def hook(_module: nn.Module, _inputs: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            store.append(hidden[:, -1, :].double().cpu())

        return hook

    def keep_input(store: list[torch.Tensor]):
        def hook(_module: nn.Module, args: tuple) -> None:
            store.append(args[0][:, -1, :].double().cpu())

        return hook

    handles = [
        decoder_layer(model, writers[layer]).register_forward_hook(keep_output(residual[layer])) for layer in residual
    ]
    handles += [
        model.get_submodule(writers[layer]).register_forward_pre_hook(keep_input(inputs[layer])) for layer in inputs
    ]
    try:
        for batch in _batches(tokenizer, prompts, batch_size, model.device):
            logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :]
            refusal.append(refusal_log_odds(logits, refusal_ids).double().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return LastToken(
        {layer: torch.cat(rows) for layer, rows in residual.items()},
        {layer: torch.cat(rows) for layer, rows in inputs.items()},
        torch.cat(refusal) if refusal else torch.zeros(0, dtype=torch.float64),
    )
