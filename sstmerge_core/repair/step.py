"""The `refusal_ablation` repair step on a merged model: fit false-refusal directions, select one, and write
its ablation exactly into the merged adapter as rank-1 LoRA factors per residual writer (docs/repair.md).

The merged update ΔW is applied by forward hooks while the directions are fitted and selected, and
W_eff = W + ΔW is formed per writer; the returned factors add ΔW_abl = −c v̂ (v̂ᵀ W_eff) to every writer, so that
the repaired weights are (I − c v̂v̂ᵀ) W_eff.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters import LoraFactors
from ..errors import InputError
from ..methods.catalog import RefusalAblationParams
from ..modeling import lora_forward
from .directions import ablation_factors, false_refusal_directions
from .residual import (
    embedding_names,
    num_layers,
    post_instruction_length,
    residual_means,
    residual_writers,
    writer_weight,
)
from .selection import PromptSets, choose, score_candidates

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
Progress = Callable[[float], None]


@dataclass(frozen=True)
class RepairData:
    """Prompts of the harmful (H, the safety data), harmless (B) and borderline-benign (P) sets, and the safety
    data's responses, whose first tokens are the refusal tokens R of the refusal score."""

    harmful: Sequence[str]
    harmless: Sequence[str]
    borderline: Sequence[str]
    refusals: Sequence[str]


@dataclass(frozen=True)
class RepairOutcome:
    """What the step did: the rank-1 factors per writer module (empty when no direction qualified) and a report."""

    factors: dict[str, LoraFactors]
    embedding_modules: frozenset[str]
    report: dict = field(default_factory=dict)

    @property
    def applied(self) -> bool:
        return bool(self.factors)


def refusal_token_ids(tokenizer, refusals: Sequence[str], step: str = "refusal_ablation") -> torch.Tensor:
    """R: the distinct first tokens of the refusal responses."""
    encoded = tokenizer(list(refusals), add_special_tokens=False)["input_ids"] if refusals else []
    first = {ids[0] for ids in encoded if ids}
    if not first:
        raise InputError(f"{step} needs safety data with responses (refusals) to define the refusal tokens")
    return torch.tensor(sorted(first))


def fit_select_split(prompts: Sequence[str], max_samples: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded subsample of at most `max_samples` distinct prompts, cut in two halves: (fit, select)."""
    unique = list(dict.fromkeys(p for p in prompts if p.strip()))
    rng = random.Random(seed)
    chosen = rng.sample(unique, min(max_samples, len(unique)))
    half = (len(chosen) + 1) // 2
    return chosen[:half], chosen[half:]


def _check(data: RepairData) -> None:
    for name in ("harmful", "harmless", "borderline"):
        if len(set(getattr(data, name))) < 2:
            raise InputError(f"refusal_ablation needs at least 2 distinct {name} prompts")


def candidate_grid(layers: int, positions: int, params: RefusalAblationParams) -> list[tuple[int, int]]:
    """(layer, position) pairs to score: the given layer/position, else every `layer_stride`-th ℓ < fraction·L and
    every post-instruction position."""
    if params.layer is not None and params.layer >= layers:
        raise InputError(f"refusal_ablation layer {params.layer} does not exist (the model has {layers} layers)")
    if params.position is not None and -params.position > positions:
        raise InputError(
            f"refusal_ablation position {params.position}: the chat template ends with only {positions} tokens"
        )
    last = max(1, int(params.max_layer_fraction * layers))
    candidate_layers = [params.layer] if params.layer is not None else list(range(0, last, params.layer_stride))
    candidate_positions = [params.position] if params.position is not None else list(range(-positions, 0))
    return [(layer, position) for layer in candidate_layers for position in candidate_positions]


def effective_writer(module: nn.Module, update: LoraFactors | None) -> torch.Tensor:
    """W_eff = W + ΔW of a residual writer, (d_model × d_in), in float64."""
    weight = writer_weight(module).double()
    return weight if update is None else weight + update.delta().double().to(weight.device)


def refusal_ablation(
    model: PreTrainedModel,
    tokenizer,
    data: RepairData,
    params: RefusalAblationParams,
    *,
    merged: Mapping[str, LoraFactors] | None = None,
    progress: Progress | None = None,
) -> RepairOutcome:
    """Fit v̂ per candidate on the fit halves, select one on the select halves, and return its ablation factors for
    the model with the merged update ΔW (`merged`, by module) added; the model's weights are not changed."""
    _check(data)
    with lora_forward(model, merged or {}):
        return _repair(model, tokenizer, data, params, merged or {}, progress)


def _repair(
    model: PreTrainedModel,
    tokenizer,
    data: RepairData,
    params: RefusalAblationParams,
    merged: Mapping[str, LoraFactors],
    progress: Progress | None,
) -> RepairOutcome:
    started = time.perf_counter()
    fixed = params.layer is not None and params.position is not None  # nothing to select: fit on every prompt
    halves = {
        name: fit_select_split(getattr(data, name), params.max_samples, params.seed + offset)
        for offset, name in enumerate(("harmful", "harmless", "borderline"))
    }
    fits = {name: fit + select if fixed else fit for name, (fit, select) in halves.items()}
    layers, positions = num_layers(model), post_instruction_length(tokenizer)
    grid = candidate_grid(layers, positions, params)
    means = {name: residual_means(model, tokenizer, fit, positions, params.batch_size) for name, fit in fits.items()}
    all_directions = false_refusal_directions(means["harmful"], means["harmless"], means["borderline"], params.lam)
    directions = {(layer, position): all_directions[layer, position].float() for layer, position in grid}
    if progress is not None:
        progress(0.1)
    writers = residual_writers(model, include_embedding=params.include_embedding)
    report: dict[str, Any] = {
        "step": "refusal_ablation",
        "params": params.model_dump(),
        "layers": layers,
        "post_instruction_tokens": positions,
        "prompts": {
            name: {"fit": len(fit), "select": 0 if fixed else len(halves[name][1])} for name, fit in fits.items()
        },
    }
    chosen: dict[str, Any] | None
    if fixed:
        chosen = {"layer": params.layer, "position": params.position}
        report |= {"chosen": chosen, "chosen_by": "given layer and position"}
    else:
        refusal_ids = refusal_token_ids(tokenizer, data.refusals)
        selection = PromptSets(*(halves[name][1] for name in ("harmful", "harmless", "borderline")))
        baseline, candidates = score_candidates(
            model,
            tokenizer,
            writers,
            directions,
            selection,
            refusal_ids,
            params,
            on_candidate=(lambda done, total: progress(0.1 + 0.9 * done / total)) if progress else None,
        )
        best = choose(candidates, baseline)
        chosen = best.to_dict() if best else None
        report |= {
            "refusal_tokens": [tokenizer.decode([int(i)]) for i in refusal_ids],
            "baseline": baseline.__dict__,
            "candidates": [c.to_dict() for c in candidates],
            "chosen": chosen,
            "chosen_by": "selection",
        }
    report["seconds"] = round(time.perf_counter() - started, 2)
    if chosen is None:
        report["reason"] = (
            "no candidate direction kept the harmless KL and the harmful refusals within bounds "
            "while lowering the borderline refusals"
        )
        log.info(
            "refusal ablation skipped", extra={"reason": report["reason"], "candidates": len(report["candidates"])}
        )
        return RepairOutcome({}, frozenset(), report)
    direction = directions[(chosen["layer"], chosen["position"])]
    factors = {
        name: ablation_factors(effective_writer(module, merged.get(name)), direction, params.strength)
        for name, module in writers.items()
    }
    embeddings = frozenset(name for name in embedding_names(model) if name in factors)
    log.info(
        "refusal ablation selected",
        extra={**chosen, "modules": len(factors), "seconds": report["seconds"]},
    )
    return RepairOutcome(factors, embeddings, report)
