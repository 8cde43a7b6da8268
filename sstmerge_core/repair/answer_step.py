"""The `answer_alignment` repair step on a merged model (docs/repair.md): fit a benign and an answer probe per
candidate layer, choose layers by held-out probe accuracy, and write per chosen layer the minimum-norm rank-1 edit of
its MLP output projection that makes the answer score follow the benign score, as LoRA factors.

The merged update ΔW is applied by forward hooks throughout. Chosen layers are edited in increasing order, each
fitted on the activations of the model that already carries the edits below it, so that every layer's targets hold
(in ridge least squares) on the fitting prompts of the final model. A prompt counts as refused by the merged model
when its first-token refusal log-odds (R: the first tokens of the safety data's responses) exceed a threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..adapters import LoraFactors
from ..errors import InputError
from ..methods.catalog import AnswerAlignmentParams
from ..modeling import lora_forward, num_layers
from .activations import LastToken, last_token_activations, mlp_writers
from .alignment import (
    LinearProbe,
    alignment_factors,
    answer_targets,
    balanced_accuracy,
    fit_probe,
    required_shift,
    ridge_solution,
)
from .step import Progress, RepairData, RepairOutcome, fit_select_split, refusal_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
STEP = "answer_alignment"
SETS = ("harmful", "harmless", "borderline")


@dataclass(frozen=True)
class Split:
    """The prompts of one half (fit or held out), H first, then B, then P, and which of them are benign (B ∪ P)."""

    prompts: list[str]
    sizes: dict[str, int]

    @property
    def benign(self) -> torch.Tensor:
        return torch.tensor([False] * self.sizes["harmful"] + [True] * (len(self.prompts) - self.sizes["harmful"]))

    def of(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """The rows of `values` that belong to set `name`."""
        start = sum(self.sizes[s] for s in SETS[: SETS.index(name)])
        return values[start : start + self.sizes[name]]


@dataclass(frozen=True)
class LayerProbes:
    layer: int
    benign: LinearProbe
    answer: LinearProbe
    accuracy: dict[str, dict[str, float | None]]  # probe → {"fit", "held_out"}

    @property
    def rank_key(self) -> tuple[float, float, int]:
        held = self.accuracy
        b, a = held["benign"]["held_out"] or 0.0, held["answer"]["held_out"] or 0.0
        return (min(b, a), b, -self.layer)


def check_data(data: RepairData) -> None:
    for name in SETS:
        if len(set(getattr(data, name))) < 2:
            raise InputError(f"{STEP} needs at least 2 distinct {name} prompts")


def candidate_layers(layers: int, params: AnswerAlignmentParams) -> list[int]:
    """The given layers (each must exist), else every `layer_stride`-th ℓ < max(1, ⌊fraction·L⌋)."""
    if params.layers is not None:
        missing = [layer for layer in params.layers if layer >= layers]
        if missing:
            raise InputError(f"{STEP} layer {missing[0]} does not exist (the model has {layers} layers)")
        return sorted(params.layers)
    return list(range(0, max(1, int(params.max_layer_fraction * layers)), params.layer_stride))


def alignment_passes(layers: int, params: AnswerAlignmentParams) -> int:
    """Passes over a half of the prompts beyond the first reads of the fit and held-out halves: one over the fit half
    per edited layer after the first (the first is fitted on the first read) and one over the held-out half with the
    edits (the cost model's count)."""
    candidates = len(candidate_layers(layers, params))
    return candidates if params.layers is not None else min(params.num_layers, candidates)


def splits(data: RepairData, params: AnswerAlignmentParams) -> tuple[Split, Split]:
    """Seeded subsamples of each set cut into a fit and a held-out half (as the ablation's fit/select halves)."""
    halves = {
        name: fit_select_split(getattr(data, name), params.max_samples, params.seed + offset)
        for offset, name in enumerate(SETS)
    }
    fit = Split([p for name in SETS for p in halves[name][0]], {name: len(halves[name][0]) for name in SETS})
    held = Split([p for name in SETS for p in halves[name][1]], {name: len(halves[name][1]) for name in SETS})
    return fit, held


def fit_layer_probes(
    layer: int,
    fit: LastToken,
    held: LastToken,
    split: tuple[Split, Split],
    answered: tuple[torch.Tensor, ...],
    c: float,
) -> LayerProbes:
    """The benign and answer probes of one layer on the fit half, with their balanced accuracies on both halves."""
    (fit_split, held_split), (fit_answered, held_answered) = split, answered
    benign = fit_probe(fit.residual[layer], fit_split.benign, c)
    answer = fit_probe(fit.residual[layer], fit_answered, c)
    accuracy = {
        "benign": {
            "fit": balanced_accuracy(benign.score(fit.residual[layer]), fit_split.benign),
            "held_out": balanced_accuracy(benign.score(held.residual[layer]), held_split.benign),
        },
        "answer": {
            "fit": balanced_accuracy(answer.score(fit.residual[layer]), fit_answered),
            "held_out": balanced_accuracy(answer.score(held.residual[layer]), held_answered),
        },
    }
    return LayerProbes(layer, benign, answer, accuracy)


def edit_layer(
    probes: LayerProbes, benign_h: torch.Tensor, now: LastToken, params: AnswerAlignmentParams
) -> tuple[LoraFactors, dict[str, Any]]:
    """ΔW = c v̂_a uᵀ for one layer: τ from the benign score of the merged model's h (`benign_h`), r and the writer
    inputs x from the model as edited so far (`now`), u the ridge solution; with the fit's numbers."""
    layer = probes.layer
    h, x = now.residual[layer], now.writer_inputs[layer]
    targets = answer_targets(probes.benign.score(benign_h), params.targets, params.margin)
    shift = required_shift(probes.answer, h, targets)
    u = ridge_solution(x, shift, params.ridge)
    factors = alignment_factors(probes.answer.direction, u, params.strength)
    before = targets - probes.answer.score(h)
    after = before - params.strength * probes.answer.norm * (x.double() @ u)
    numbers = {
        "target_rms": {"before": _rms(before), "after": _rms(after)},
        "update_norm": factors.frobenius_norm(),
    }
    return factors, numbers


def check_finite(read: LastToken) -> None:
    """Refuse (code non_finite_result) activations or refusal scores of the merged model that are not finite."""
    parts = {f"layer {layer}": h for layer, h in read.residual.items()}
    parts |= {f"layer {layer}'s MLP input": x for layer, x in read.writer_inputs.items()}
    for where, values in {**parts, "refusal score": read.refusal}.items():
        if not bool(torch.isfinite(values).all()):
            raise InputError(
                f"{STEP}: the merged model's {where} at the last prompt token is not finite", code="non_finite_result"
            )


def _rms(values: torch.Tensor) -> float:
    return float(values.double().square().mean().sqrt())


def _refusals(split: Split, refusal: torch.Tensor, threshold: float) -> dict[str, dict[str, float]]:
    return {
        name: {
            "refusal_log_odds": float(split.of(name, refusal).mean()),
            "refused": float((split.of(name, refusal) > threshold).double().mean()),
        }
        for name in SETS
    }


def answer_alignment(
    model: PreTrainedModel,
    tokenizer,
    data: RepairData,
    params: AnswerAlignmentParams,
    *,
    merged: Mapping[str, LoraFactors] | None = None,
    progress: Progress | None = None,
) -> RepairOutcome:
    """Probe, choose layers and return the rank-1 edit factors of their MLP output projections for the model with
    the merged update ΔW (`merged`, by module) added; the model's weights are not changed."""
    check_data(data)
    refusal_ids = refusal_token_ids(tokenizer, data.refusals, step=STEP)
    candidates = candidate_layers(num_layers(model), params)
    with lora_forward(model, merged or {}):
        return _align(model, tokenizer, data, params, refusal_ids, candidates, progress)


def _align(
    model: PreTrainedModel,
    tokenizer,
    data: RepairData,
    params: AnswerAlignmentParams,
    refusal_ids: torch.Tensor,
    candidates: Sequence[int],
    progress: Progress | None,
) -> RepairOutcome:
    started = time.perf_counter()
    fit_split, held_split = splits(data, params)
    writers = mlp_writers(model)

    def read(split: Split, layers: Sequence[int], *, inputs: bool = False) -> LastToken:
        return last_token_activations(
            model, tokenizer, split.prompts, layers, refusal_ids, params.batch_size, writer_inputs=inputs
        )

    # the fit half's first read also keeps the writers' inputs: the first edited layer is fitted on it (no edits yet)
    fit, held = read(fit_split, candidates, inputs=True), read(held_split, candidates)
    check_finite(fit)
    check_finite(held)
    answered = (fit.refusal <= params.refusal_threshold, held.refusal <= params.refusal_threshold)
    report: dict[str, Any] = {
        "step": STEP,
        "params": params.model_dump(),
        "layers": num_layers(model),
        "prompts": {name: {"fit": fit_split.sizes[name], "held_out": held_split.sizes[name]} for name in SETS},
        "refused": {"fit": int((~answered[0]).sum()), "held_out": int((~answered[1]).sum())},
        "held_out": {"before": _refusals(held_split, held.refusal, params.refusal_threshold)},
    }
    if progress is not None:
        progress(0.3)

    def done(reason: str | None, factors: dict[str, LoraFactors], summary: str) -> RepairOutcome:
        report["seconds"] = round(time.perf_counter() - started, 2)
        report["summary"] = summary
        if progress is not None:
            progress(1.0)
        if reason is not None:
            report.update(chosen=None, reason=reason)
            log.info("answer alignment skipped", extra={"reason": reason})
        return RepairOutcome(factors, frozenset(), report)

    refused_fit = int((~answered[0]).sum())
    if refused_fit == 0 or refused_fit == len(fit_split.prompts):
        reason = (
            f"the merged model refuses {refused_fit} of {len(fit_split.prompts)} fitting prompts (first-token refusal "
            f"log-odds > {params.refusal_threshold:g}): an answer direction needs both refused and answered prompts"
        )
        return done(reason, {}, f"nothing was changed: {reason}.")
    probes = [
        fit_layer_probes(layer, fit, held, (fit_split, held_split), answered, params.probe_c) for layer in candidates
    ]
    report["candidates"] = [{"layer": p.layer, **p.accuracy} for p in probes]
    usable = [p for p in probes if p.answer.norm > 0]
    if params.layers is not None:
        chosen = sorted(usable, key=lambda p: p.layer)
        report["chosen_by"] = "given layers"
    else:
        chosen = sorted(
            sorted(usable, key=lambda p: p.rank_key, reverse=True)[: params.num_layers], key=lambda p: p.layer
        )
        report["chosen_by"] = "held-out probe accuracy: min(benign, answer), then benign, then the lower layer"
    if not chosen:
        return done("no layer has a non-zero answer direction", {}, "nothing was changed: no answer direction.")
    if params.strength == 0:
        report["chosen"] = [{"layer": p.layer, "module": writers[p.layer], **p.accuracy} for p in chosen]
        return done(None, {}, "nothing was changed: strength 0.")

    edits: dict[str, LoraFactors] = {}
    report["chosen"] = []
    for i, probe in enumerate(chosen):
        if edits:
            with lora_forward(model, edits):
                now = read(fit_split, [probe.layer], inputs=True)
            check_finite(now)
        else:
            now = fit
        factors, numbers = edit_layer(probe, fit.residual[probe.layer], now, params)
        edits[writers[probe.layer]] = factors
        report["chosen"].append({"layer": probe.layer, "module": writers[probe.layer], **probe.accuracy, **numbers})
        if progress is not None:
            progress(0.3 + 0.6 * (i + 1) / len(chosen))
    with lora_forward(model, edits):
        after = read(held_split, [])
    report["held_out"]["after"] = _refusals(held_split, after.refusal, params.refusal_threshold)
    layers = ", ".join(str(p.layer) for p in chosen)
    summary = (
        f"the answer score of layer(s) {layers} set to follow the benign score ({params.targets}, m = "
        f"{params.margin:g}) by a rank-1 edit of each layer's MLP output projection, strength c = {params.strength:g}, "
        f"ridge {params.ridge:g} ({report['chosen_by']})"
    )
    log.info("answer alignment applied", extra={"layers": layers, "seconds": round(time.perf_counter() - started, 2)})
    return done(None, edits, summary + ".")
