"""The `calibration` repair step in a job (docs/repair.md): its sets read at loading, the `before` model's answers
made once per job (and cached on disk), then a calibration LoRA trained on the model merged at every α and
concatenated to the merged factors."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import LoraFactors, load_adapter
from ..cache import default_cache_dir, model_fingerprint
from ..data import Example, load_examples
from ..errors import InputError
from ..jobspec import MergeSpec
from ..methods.catalog import CalibrationParams, parse_repair
from ..modeling import ModelRef
from ..progress import CalibrationSize
from ..repair.calibration import CalibrationSet, calibrate
from ..repair.targets import AnswerCache, BeforeModel, Targets, before_answers, compliant_targets
from .merging import MergedUpdates, map_factors
from .repair import with_repair

SETS = ("borderline", "harmful", "retain", "harmless")
COMPLIANT = ("borderline", "retain", "harmless")  # targets: own responses, else the `before` model's answers


@dataclass(frozen=True)
class CalibrationInputs:
    """The step's parameters, its rows per set (borderline P, harmful H with refusals, retain = the utility data,
    harmless B; the last two may be empty), the `before` model, the judge and the answer cache."""

    params: CalibrationParams
    rows: Mapping[str, tuple[Example, ...]]
    before: BeforeModel
    judge: Any
    cache: AnswerCache | None
    _made: dict = field(default_factory=dict, compare=False, repr=False)  # the prepared sets, once per job

    @property
    def targets_made(self) -> bool:
        """Whether the targets (the `before` model's answers) are already prepared for this job."""
        return bool(self._made)

    def prepared(self, model, tokenizer, on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """{"examples": {set: rows with targets}, "report": …}: the targets of every set, the `before` model's
        answers generated at the first call (`on_batch(done, total)` per batch) and reused after."""
        if not self._made:
            self._made.update(prepare_sets(self, model, tokenizer, on_batch))
        return self._made

    def to_generate(self) -> list[str]:
        """The distinct prompts of the compliant sets that have no response of their own."""
        return list(dict.fromkeys(e.prompt for name in COMPLIANT for e in self.rows[name] if e.response is None))


def subsample(examples: list[Example], max_samples: int, seed: int) -> tuple[Example, ...]:
    """All rows, or a seeded uniform subset of `max_samples` in file order."""
    if len(examples) <= max_samples:
        return tuple(examples)
    return tuple(examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), max_samples)))


def before_model(spec: MergeSpec) -> BeforeModel:
    """ΔU = Σ_i w_i ΔU_i of the job's utility adapters, per module (exact concatenation), and its cache identity."""
    parts: dict[str, list[LoraFactors]] = {}
    adapters = []
    for given in spec.utility:
        adapter = load_adapter(given.path, name=given.name)
        adapters.append((adapter.sha256, given.weight))
        for module, factors in adapter.modules.items():
            parts.setdefault(module, []).append(factors.scaled(given.weight))
    ref = ModelRef.parse(spec.base_model)
    identity = {"model": model_fingerprint(ref.name_or_path, ref.revision), "dtype": spec.dtype, "utility": adapters}
    return BeforeModel({m: LoraFactors.concat(p).as_stored() for m, p in parts.items()}, identity)


def load_calibration_inputs(spec: MergeSpec, judge: Any = None) -> CalibrationInputs:
    """The step's data (read at loading, so that a bad file fails before any pass) and settings; `judge` is the
    job's refusal judge (the keyword judge when the job does not evaluate)."""
    from ..evaluation.judges import KeywordJudge

    assert spec.repair is not None and spec.safety_data and spec.borderline_data  # MergeSpec checks it
    params = parse_repair(spec.repair.method, spec.repair.params)
    assert isinstance(params, CalibrationParams)
    files = {
        "borderline": (spec.borderline_data, False),
        "harmful": (spec.safety_data, True),
        "retain": (spec.utility_data, False),
        "harmless": (spec.harmless_data, False),
    }
    rows = {
        name: subsample(load_examples(path, require_response=needs), params.max_samples, params.seed + offset)
        if path
        else ()
        for offset, (name, (path, needs)) in enumerate(files.items())
    }
    folder = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    return CalibrationInputs(params, rows, before_model(spec), judge or KeywordJudge(), AnswerCache(folder / "answers"))


def prepare_sets(
    inputs: CalibrationInputs, model, tokenizer, on_batch: Callable[[int, int], None] | None
) -> dict[str, Any]:
    """The mixture's sets with their targets, and the report's account of them. Raises `InputError` when no
    borderline prompt keeps a compliant target."""
    started = time.perf_counter()
    prompts = inputs.to_generate()
    done = 0

    def tick(count: int) -> None:
        nonlocal done
        done += count
        if on_batch is not None:
            on_batch(done, len(prompts))

    answers, cached = before_answers(
        model,
        tokenizer,
        inputs.before,
        prompts,
        inputs.params.max_target_tokens,
        cache=inputs.cache,
        on_batch=tick,
    )
    by_prompt = dict(zip(prompts, answers, strict=True))
    targets: dict[str, Targets] = {
        name: compliant_targets(inputs.rows[name], by_prompt, inputs.judge, judge_own=name == "borderline")
        for name in COMPLIANT
    }
    harmful = list(inputs.rows["harmful"])
    if not targets["borderline"].examples:
        t = targets["borderline"]
        raise InputError(
            f"calibration: no borderline prompt keeps a compliant target ({t.dropped_refusals} of "
            f"{len(inputs.rows['borderline'])} targets are refusals, {t.dropped_empty} empty); give the borderline "
            "rows their own responses"
        )
    examples = {**{name: t.examples for name, t in targets.items()}, "harmful": harmful}
    report = {
        "sets": {
            name: targets[name].summary(len(inputs.rows[name]))
            if name in targets
            else {"rows": len(harmful), "used": len(harmful), "generated": 0}
            for name in SETS
        },
        "judge": getattr(inputs.judge, "name", type(inputs.judge).__name__),
        "answers": {"prompts": len(prompts), "cached": cached, "seconds": round(time.perf_counter() - started, 2)},
    }
    return {"examples": examples, "report": report}


def mixture(params: CalibrationParams, examples: Mapping[str, Sequence[Example]]) -> list[CalibrationSet]:
    """The mixture's sets with the weights of `params` (prepared targets are shared by trials of other weights)."""
    weights = {
        "borderline": params.borderline_weight,
        "harmful": params.harmful_weight,
        "retain": params.retain_weight,
        "harmless": params.harmless_weight,
    }
    return [CalibrationSet(name, examples[name], weights[name]) for name in SETS]


def calibrate_updates(
    model,
    tokenizer,
    merged: MergedUpdates,
    inputs: CalibrationInputs,
    *,
    progress: Callable[[float, float], None] | None = None,
) -> MergedUpdates:
    """The calibration step on the model merged at every α of `merged`: each α's factors with the trained factors
    concatenated, and the step's report per α; the model's weights are unchanged on return. Progress counts models:
    within the first, the `before` model's answers (when not yet made) weigh their prompts against the training's
    steps × batch rows."""
    params = inputs.params
    fresh = 0 if inputs.targets_made or params.steps == 0 else len(inputs.to_generate())
    train_rows = params.steps * params.batch_size
    lead = fresh / (fresh + train_rows) if fresh else 0.0
    by_alpha: dict[float, dict] = {}
    reports: dict[float, Mapping] = {}
    for i, alpha in enumerate(merged.alphas):

        def advance(fraction: float, i: int = i) -> None:
            if progress is not None:
                progress(i + fraction, len(merged.alphas))

        if params.steps == 0:
            sets, made = [], {}
        else:
            made = inputs.prepared(model, tokenizer, lambda done, total: advance(lead * done / max(total, 1)))
            sets = mixture(params, made["examples"])
        start = lead if i == 0 else 0.0

        def on_step(step: int, steps: int, start: float = start) -> None:
            advance(start + (1 - start) * step / steps)

        outcome = calibrate(
            model,
            tokenizer,
            sets,
            params,
            merged=merged.updates(alpha),
            targets=linear_targets(model, merged.by_alpha[alpha]),
            progress=on_step,
        )
        by_alpha[alpha] = map_factors(with_repair(merged.by_alpha[alpha], outcome.factors), LoraFactors.as_stored)
        reports[alpha] = {**outcome.report, **made.get("report", {})}
        advance(1.0)
    return dataclasses.replace(merged, by_alpha=by_alpha, repairs=reports)


def linear_targets(model, modules: Mapping[str, Any]) -> list[str]:
    """The merged adapter's Linear/Conv1D modules (an embedding LoRA of an input adapter is not calibrated)."""
    return sorted(name for name in modules if not isinstance(model.get_submodule(name), nn.Embedding))


def calibration_size(inputs: CalibrationInputs, tokenizer, models: int) -> CalibrationSize:
    """The step's work: the `before` model's answers once, then `steps` training steps on every merged model."""
    from .sizes import mean_tokens

    params = inputs.params
    rows = [e for name in SETS for e in inputs.rows[name]]
    prompts = [Example(p) for p in inputs.to_generate()]
    return CalibrationSize(
        models=models,
        steps=params.steps,
        batch_size=params.batch_size,
        tokens=min(
            mean_tokens(tokenizer, [Example(e.prompt) for e in rows], params.max_length, responses=False)
            + params.max_target_tokens,
            params.max_length,
        ),
        generated=len(prompts) if params.steps else 0,
        prompt_tokens=mean_tokens(tokenizer, prompts, params.max_length, responses=False),
        new_tokens=params.max_target_tokens,
    )
