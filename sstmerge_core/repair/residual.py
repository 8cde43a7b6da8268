"""Model plumbing for refusal-direction ablation: the modules that write into the residual stream, their
ablation by forward hooks, and residual-stream activations and next-token logits at the end of a prompt.

Prompts are encoded as in evaluation (the chat template, `prompting.chat_prompt`) and padded on the left, so
the last K positions of every row are the same K post-instruction tokens (the template's end-of-turn and
assistant header). Position ids follow the attention mask, as in generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ModelError
from ..modeling import is_conv1d, linear_module_names, num_layers, weight_of
from ..prompting import chat_prompt
from .directions import project_out

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The two writers of each decoder layer: Llama / Mistral / Qwen2 and GPT-2 layouts.
WRITER_SUFFIXES = ("self_attn.o_proj", "mlp.down_proj", "attn.c_proj", "mlp.c_proj")
POSITIONAL_EMBEDDINGS = ("transformer.wpe",)
_MARK = "\u2063sstmerge\u2063"


def embedding_names(model: PreTrainedModel) -> list[str]:
    """The input embedding (and GPT-2's learned positional embedding), by module name."""
    token = model.get_input_embeddings()
    names = [name for name, module in model.named_modules() if module is token]
    names += [name for name, _ in model.named_modules() if name in POSITIONAL_EMBEDDINGS]
    return names


def residual_writers(model: PreTrainedModel, *, include_embedding: bool = True) -> dict[str, nn.Module]:
    """Every module whose output is added to the residual stream: each layer's attention output and MLP output
    projections, plus the embeddings when `include_embedding`. Raises `ModelError` for an unknown layout."""
    layers = num_layers(model)
    writers = {name: model.get_submodule(name) for name in linear_module_names(model) if name.endswith(WRITER_SUFFIXES)}
    if len(writers) != 2 * layers:
        raise ModelError(
            f"expected 2 residual writers per layer ({', '.join(WRITER_SUFFIXES)}) in {layers} layers, found "
            f"{len(writers)}; refusal ablation supports Llama, Mistral, Qwen2 and GPT-2 layouts"
        )
    if include_embedding:
        writers.update({name: model.get_submodule(name) for name in embedding_names(model)})
    return dict(sorted(writers.items()))


def writer_weight(module: nn.Module) -> torch.Tensor:
    """W_eff as the map into the residual stream, (d_model × d_in): Linear W, Conv1D Wᵀ, embedding Eᵀ (d × V)."""
    weight = weight_of(module).detach()
    return weight.T if is_conv1d(module) or isinstance(module, nn.Embedding) else weight


@contextlib.contextmanager
def ablated(writers: dict[str, nn.Module], direction: torch.Tensor, strength: float) -> Iterator[None]:
    """While active, every writer's output y becomes (I − c v̂v̂ᵀ) y (forward hooks; weights untouched)."""

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return project_out(output, direction.to(output.device), strength)

    handles = [module.register_forward_hook(hook) for module in writers.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def post_instruction_length(tokenizer) -> int:
    """K: how many tokens the chat template puts after the user's message (end of turn, assistant header)."""
    text = chat_prompt(tokenizer, _MARK)
    suffix = text[text.index(_MARK) + len(_MARK) :]
    return max(1, len(tokenizer(suffix, add_special_tokens=False)["input_ids"]))


def _batches(tokenizer, prompts: Sequence[str], batch_size: int, device: torch.device) -> Iterator[dict]:
    ids = tokenizer([chat_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
    for start in range(0, len(ids), batch_size):
        batch = tokenizer.pad(
            {"input_ids": ids[start : start + batch_size]}, padding=True, padding_side="left", return_tensors="pt"
        )
        mask = batch["attention_mask"]
        yield {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0).to(device),
        }


@torch.no_grad()
def residual_means(
    model: PreTrainedModel, tokenizer, prompts: Sequence[str], positions: int, batch_size: int
) -> torch.Tensor:
    """Mean residual stream entering each layer at the last `positions` prompt tokens: (L, K, d), float64."""
    if not prompts:
        raise ValueError("no prompts to average")
    layers = num_layers(model)
    total: torch.Tensor | None = None
    for batch in _batches(tokenizer, prompts, batch_size, model.device):
        hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        stacked = torch.stack([h[:, -positions:, :] for h in hidden[:layers]]).double().sum(dim=1)
        total = stacked if total is None else total + stacked
    assert total is not None
    return (total / len(prompts)).cpu()


@torch.no_grad()
def last_token_logits(model: PreTrainedModel, tokenizer, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Next-token logits after each prompt (the first token of the answer): (N, V), float32 on the CPU."""
    rows = []
    for batch in _batches(tokenizer, prompts, batch_size, model.device):
        rows.append(model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :].float().cpu())
    return torch.cat(rows)
