"""The `calibration` repair step on a merged model: a short fine-tune of a new LoRA on the frozen merged model,
written exactly into the merged adapter by concatenation (docs/repair.md).

The merged model is W_eff = W + ΔW (ΔW applied by forward hooks, frozen). A fresh PEFT LoRA of rank r_c with
scale s = lora_alpha / r_c = 2 on the merged adapter's target modules adds ΔW_c = s·B_c A_c. Each of `steps`
AdamW steps draws `batch_size` rows with replacement from the union of the sets k (borderline P, harmful H,
retain, harmless B), row i of set k with probability ∝ w_k / n_k, so that set k makes up a share
w_k / Σ_j w_j of every batch in expectation, and takes a step on the mean token cross-entropy of the batch's
target tokens. The repaired module is W + ΔW + s·B_c A_c, i.e. the LoRA [B | s·B_c], [A; A_c] (ranks add).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..adapters import LoraFactors
from ..data import Example
from ..errors import InputError
from ..methods.catalog import CalibrationParams
from ..modeling import is_conv1d, lora_forward
from ..prompting import Encoded
from ..training import MAX_GRAD_NORM, collate, encode_examples, linear_schedule, response_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
LORA_SCALE = 2.0  # s = lora_alpha / r_c
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CalibrationSet:
    """One part of the mixture: its rows (prompt and target) and its weight w_k."""

    name: str
    examples: Sequence[Example]
    weight: float


@dataclass(frozen=True)
class CalibrationOutcome:
    """The calibration factors per module (empty for steps = 0) and the step's report."""

    factors: dict[str, LoraFactors]
    report: dict = field(default_factory=dict)


def encode_target(tokenizer, example: Example, max_target_tokens: int, max_length: int) -> Encoded:
    """Chat prompt + target (+ end of turn) as in training, the target cut to `max_target_tokens` tokens (a cut
    target loses its end of turn: the model is not taught to stop there)."""
    encoded = encode_examples(tokenizer, [example], max_length)[0]
    end = encoded.response_start + max_target_tokens
    target = encoded.input_ids[encoded.response_start :]
    ids = encoded.input_ids if len(target) <= max_target_tokens + 1 else encoded.input_ids[:end]
    return Encoded(ids, encoded.response_start)


def mixture(sets: Sequence[CalibrationSet]) -> tuple[list[int], list[float], dict[str, float]]:
    """(row index into the concatenated sets, its draw weight w_k/n_k) for every row of a set with rows and weight
    > 0, and each such set's share w_k / Σ_j w_j of a batch."""
    used = [s for s in sets if s.examples and s.weight > 0]
    total = sum(s.weight for s in used)
    rows: list[int] = []
    weights: list[float] = []
    start = 0
    for s in sets:
        if s in used:
            rows += range(start, start + len(s.examples))
            weights += [s.weight / len(s.examples)] * len(s.examples)
        start += len(s.examples)
    return rows, weights, {s.name: s.weight / total for s in used}


@contextlib.contextmanager
def calibration_model(
    model: PreTrainedModel, merged: Mapping[str, LoraFactors], targets: Sequence[str], rank: int, seed: int
) -> Iterator[Any]:
    """The merged model (ΔW by hooks, every weight frozen) with a fresh PEFT LoRA of rank r_c on `targets`, seeded;
    on exit the LoRA is unloaded and every parameter's `requires_grad` is as it was."""
    from peft import LoraConfig, get_peft_model

    flags = [(p, p.requires_grad) for p in model.parameters()]
    config = LoraConfig(
        r=rank,
        lora_alpha=LORA_SCALE * rank,  # type: ignore[arg-type]  # PEFT annotates int; a float scales (α/r) the same
        target_modules=list(targets),
        fan_in_fan_out=is_conv1d(model.get_submodule(targets[0])),
        lora_dropout=0.0,
        bias="none",
    )
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with lora_forward(model, merged):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config)
        try:
            yield peft_model
        finally:
            peft_model.unload()
            for parameter, flag in flags:
                parameter.requires_grad_(flag)


def trained_factors(peft_model, targets: Sequence[str]) -> dict[str, LoraFactors]:
    """ΔW_c = s·B_c A_c of every target module, (d_out × d_in) as PEFT stores it (Conv1D included), in float32."""
    factors = {}
    for name in targets:
        layer = peft_model.base_model.model.get_submodule(name)
        A = layer.lora_A["default"].weight.detach().float().cpu().clone()
        B = layer.lora_B["default"].weight.detach().float().cpu().clone()
        factors[name] = LoraFactors(B, A, float(layer.scaling["default"]))
    return factors


def train_steps(
    peft_model,
    tokenizer,
    encoded: Sequence[Encoded],
    rows: list[int],
    weights: list[float],
    params,
    on_step: Progress | None = None,
    losses: list[float] | None = None,
) -> list[float]:
    """`params.steps` AdamW steps on batches drawn from `rows` by `weights` (seeded); the loss of every step,
    appended to `losses` as they come. Raises `InputError` (code non_finite_result) at the first non-finite loss."""
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=params.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(params.steps))
    rng = random.Random(params.seed)
    losses = [] if losses is None else losses
    for step in range(1, params.steps + 1):
        batch = [encoded[i] for i in rng.choices(rows, weights=weights, k=params.batch_size)]
        loss = response_loss(peft_model, collate(batch, tokenizer.pad_token_id))
        if not torch.isfinite(loss):
            raise InputError(
                f"calibration: the loss is not finite at step {step} of {params.steps} (a merged update with inf "
                "or NaN, or a learning rate too high)",
                code="non_finite_result",
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, params.steps)
    return losses


def check_factors(factors: Mapping[str, LoraFactors]) -> None:
    """Refuse (code non_finite_result, naming the module) trained factors with an inf or NaN."""
    for name, f in factors.items():
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
            raise InputError(f"calibration: the trained LoRA of module {name} is not finite", code="non_finite_result")


def loss_summary(losses: Sequence[float]) -> dict:
    """First and last step's loss, the means of the first and last tenth, and at most 100 evenly spaced losses."""
    if not losses:
        return {}
    tenth = max(1, len(losses) // 10)
    stride = math.ceil(len(losses) / 100)
    return {
        "first": round(losses[0], 5),
        "last": round(losses[-1], 5),
        "first_tenth_mean": round(sum(losses[:tenth]) / tenth, 5),
        "last_tenth_mean": round(sum(losses[-tenth:]) / tenth, 5),
        "every": stride,
        "curve": [round(x, 4) for x in losses[::stride]],
    }


def calibrate(
    model: PreTrainedModel,
    tokenizer,
    sets: Sequence[CalibrationSet],
    params: CalibrationParams,
    *,
    merged: Mapping[str, LoraFactors],
    targets: Sequence[str],
    progress: Progress | None = None,
) -> CalibrationOutcome:
    """Train the calibration LoRA on the model with the merged update `merged` (by module) on the mixture of `sets`
    and return its factors on `targets` (the merged adapter's modules); the model is unchanged on return. Steps = 0
    trains nothing and returns no factors."""
    started = time.perf_counter()
    rows, weights, shares = mixture(sets)
    report: dict[str, Any] = {"step": "calibration", "params": params.model_dump(), "mixture": shares}
    if params.steps == 0 or not targets:
        return CalibrationOutcome({}, report | {"trained": False, "reason": "steps = 0" if targets else "no modules"})
    encoded = [
        encode_target(tokenizer, e, params.max_target_tokens, params.max_length) for s in sets for e in s.examples
    ]
    every = max(1, params.steps // 10)
    losses: list[float] = []

    def on_step(step: int, steps: int) -> None:
        if step % every == 0 or step == steps:
            log.info("calibration", extra={"step": step, "steps": steps, "loss": round(losses[-1], 4)})
        if progress is not None:
            progress(step, steps)

    with calibration_model(model, merged, targets, params.rank, params.seed) as peft_model:
        train_steps(peft_model, tokenizer, encoded, rows, weights, params, on_step, losses)
        factors = trained_factors(peft_model, targets)
    check_factors(factors)
    report |= {
        "trained": True,
        "modules": len(factors),
        "rank": params.rank,
        "loss": loss_summary(losses),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return CalibrationOutcome(factors, report)
