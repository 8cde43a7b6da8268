"""Evaluate a base model and its adapter variants on harmful, benign and utility prompts → metrics.json.

The base model is loaded once; each variant is applied in place with `modeling.merged_deltas`
(W ← W + Σ_i w_i ΔW_i, restored bit-exactly afterwards, also on errors), so every variant is scored on
exactly W + ΔW, without re-loading or PEFT wrappers. The layout of the returned dict is documented in
README.md next to this file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from ..adapters import LoraFactors, load_adapter
from ..data import Example, examples_sha256, load_examples
from ..errors import InputError
from ..jobspec import AdapterInput, EvaluationSpec
from ..modeling import load_base_model, merged_deltas, resolve_device
from .derived import Candidate, Scores, derived_metrics, pareto_flags, recommend
from .generation import generate, response_nll
from .judges import Judge, make_judge
from .metrics import UTILITY_METRICS, UtilityMetric, summarize_utility
from .plot import render_png
from .stats import Rate

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SAMPLES_PER_SET = 3
VariantKind = Literal["base", "before", "safety", "merged", "baseline"]
COMPARED_KINDS = ("safety", "merged", "baseline")
"""Kinds that get derived metrics against the reference (before, else base)."""
Progress = Callable[[str, float], None]
"""progress(stage, fraction of the whole evaluation done); it may raise (e.g. `Cancelled`) to stop."""


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: the base model plus the weighted sum of `adapters` (none for kind "base").

    `adapters` takes `AdapterInput`s (path + weight) or plain folders (weight 1); a single folder may be
    given on its own. `method`, `alpha` and `params` describe how a merged variant or baseline was made.
    """

    label: str
    kind: VariantKind
    adapters: tuple[AdapterInput, ...] = ()
    method: str | None = None
    alpha: float | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        items = [self.adapters] if isinstance(self.adapters, (str, Path, AdapterInput)) else self.adapters
        terms = tuple(a if isinstance(a, AdapterInput) else AdapterInput(path=str(a)) for a in items)
        object.__setattr__(self, "adapters", terms)
        if self.kind not in get_args(VariantKind):
            raise InputError(f"variant {self.label!r}: unknown kind {self.kind!r}; one of {get_args(VariantKind)}")
        if (self.kind == "base") != (not terms):
            raise InputError(f"variant {self.label!r}: kind 'base' takes no adapters, every other kind at least one")


@dataclass(frozen=True)
class EvaluationData:
    """The three evaluation sets, loaded once (the first `limit` rows of each)."""

    harmful: list[Example]
    benign: list[Example]
    utility: list[Example]

    @classmethod
    def load(cls, spec: EvaluationSpec) -> EvaluationData:
        """Reads the files; utility examples must have a reference `response`. Raises `DatasetError`."""
        return cls(
            harmful=load_examples(spec.harmful, limit=spec.limit),
            benign=load_examples(spec.benign, limit=spec.limit),
            utility=load_examples(spec.utility_eval, require_response=True, limit=spec.limit),
        )

    @property
    def size(self) -> int:
        return len(self.harmful) + len(self.benign) + len(self.utility)

    def summary(self) -> dict:
        """{"harmful"|"benign"|"utility_eval": {"n", "sha256"}}, sha256 = `data.examples_sha256` of the rows used."""
        sets = {"harmful": self.harmful, "benign": self.benign, "utility_eval": self.utility}
        return {name: {"n": len(rows), "sha256": examples_sha256(rows)} for name, rows in sets.items()}


def variant_deltas(variant: Variant) -> tuple[dict[str, LoraFactors], list[dict]]:
    """ΔW_m = Σ_i w_i ΔW_i,m per module as one concatenated LoRA (exact; formed densely only when applied),
    and each adapter's {"name", "weight", "sha256"}."""
    parts: dict[str, list[LoraFactors]] = {}
    provenance = []
    for term in variant.adapters:
        adapter = load_adapter(term.path, name=term.name)
        provenance.append({"name": adapter.name, "weight": term.weight, "sha256": adapter.sha256})
        for module, factors in adapter.modules.items():
            parts.setdefault(module, []).append(factors.scaled(term.weight))
    return {m: LoraFactors.concat(p) for m, p in parts.items()}, provenance


@dataclass(frozen=True)
class ModelResult:
    """What one evaluated model scored, before comparison with the others."""

    safety: Rate
    over_refusal: Rate
    utility: dict
    samples: dict

    def scores(self, higher_is_better: bool) -> Scores:
        utility = self.utility["value"] if higher_is_better else -self.utility["value"]
        return Scores(self.safety.rate, self.over_refusal.rate, utility)


def _refusal_samples(examples: list[Example], completions: list[str], refused: list[bool]) -> list[dict]:
    return [
        {"prompt": e.prompt, "completion": c, "refused": r}
        for e, c, r in list(zip(examples, completions, refused))[:SAMPLES_PER_SET]
    ]


def evaluate_model(
    model,
    tokenizer,
    data: EvaluationData,
    judge: Judge,
    metric: UtilityMetric,
    spec: EvaluationSpec,
    tick: Callable[[str], Callable[[int], None]],
) -> ModelResult:
    """Scores the model as it is now: refusal rates on harmful and benign prompts and utility.
    `tick(set_name)` returns the per-batch progress callback for that set."""
    refusal_rates, samples = {}, {}
    for name, examples in (("harmful", data.harmful), ("benign", data.benign)):
        prompts = [e.prompt for e in examples]
        completions = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
            on_batch=tick(name),
        )
        refused = judge.judge(prompts, completions)
        refusal_rates[name] = Rate.count(refused)
        samples[name] = _refusal_samples(examples, completions, refused)
    if metric.needs_generation:
        completions = generate(
            model,
            tokenizer,
            [e.prompt for e in data.utility],
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
            on_batch=tick("utility"),
        )
        scores = [metric.score(c, e.response) for c, e in zip(completions, data.utility)]
    else:
        completions = [None] * len(data.utility)
        scores = response_nll(model, tokenizer, data.utility, batch_size=spec.batch_size, on_batch=tick("utility"))
    samples["utility"] = [
        {"prompt": e.prompt, "completion": c, "reference": e.response, "score": s}
        for e, c, s in list(zip(data.utility, completions, scores))[:SAMPLES_PER_SET]
    ]
    return ModelResult(refusal_rates["harmful"], refusal_rates["benign"], summarize_utility(metric, scores), samples)


def _check_variants(variants: Sequence[Variant]) -> Variant:
    """Labels unique, at most one base and one before; returns the reference (before, else base)."""
    labels = [v.label for v in variants]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise InputError(f"variant labels must be unique; repeated: {duplicates}")
    by_kind = {kind: [v for v in variants if v.kind == kind] for kind in ("base", "before")}
    for kind, found in by_kind.items():
        if len(found) > 1:
            raise InputError(f"at most one {kind!r} variant; got {[v.label for v in found]}")
    reference = by_kind["before"] or by_kind["base"]
    if not reference:
        raise InputError("the variants need a 'before' (base + utility) or a 'base' variant to compare against")
    return reference[0]


class _ProgressCounter:
    """Turns per-batch example counts into progress(stage, overall fraction) calls."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, max(total, 1), 0

    def stage(self, label: str) -> Callable[[str], Callable[[int], None]]:
        def tick(set_name: str) -> Callable[[int], None]:
            def advance(count: int) -> None:
                self.done += count
                if self.progress is not None:
                    self.progress(f"evaluate {label}: {set_name}", min(self.done / self.total, 1.0))

            return advance

        return tick


def _model_entry(variant: Variant, provenance: list[dict], result: ModelResult) -> dict:
    return {
        "label": variant.label,
        "kind": variant.kind,
        "method": variant.method,
        "alpha": variant.alpha,
        "params": variant.params,
        "adapters": provenance,
        "safety": result.safety.to_dict(),
        "over_refusal": result.over_refusal.to_dict(),
        "utility": result.utility,
    }


def evaluate_variants(
    model,
    tokenizer,
    variants: Sequence[Variant],
    spec: EvaluationSpec,
    progress: Progress | None = None,
    *,
    data: EvaluationData | None = None,
    judge: Judge | None = None,
    main_method: str | None = None,
) -> dict:
    """Evaluate every variant on the loaded base `model` and return the metrics.json dict.

    `data` and `judge` may be passed pre-loaded (to fail fast before loading a model); by default they come
    from `spec`. Derived metrics compare each safety/merged/baseline variant with the reference ("before",
    else "base"). The recommended α is chosen among the merged variants of `main_method` (default: the
    method of the first merged variant). The model's weights are unchanged on return.
    """
    reference = _check_variants(variants)
    if data is None:
        data = EvaluationData.load(spec)
    if judge is None:
        judge = make_judge(spec.judge, device=str(model.device))
    metric = UTILITY_METRICS[spec.utility_metric]
    counter = _ProgressCounter(progress, data.size * len(variants))

    entries, results = [], {}
    for variant in variants:
        started = time.perf_counter()
        deltas, provenance = variant_deltas(variant)
        with merged_deltas(model, deltas):
            result = evaluate_model(model, tokenizer, data, judge, metric, spec, counter.stage(variant.label))
        results[variant.label] = result
        entries.append(_model_entry(variant, provenance, result))
        log.info(
            "evaluated variant",
            extra={
                "label": variant.label,
                "modules": len(deltas),
                "safety": round(result.safety.rate, 4),
                "over_refusal": round(result.over_refusal.rate, 4),
                metric.name: round(result.utility["value"], 4),
                "seconds": round(time.perf_counter() - started, 1),
            },
        )

    scores = {label: r.scores(metric.higher_is_better) for label, r in results.items()}
    for entry, pareto in zip(entries, pareto_flags(list(scores.values()))):
        compared = entry["kind"] in COMPARED_KINDS
        entry["derived"] = derived_metrics(scores[reference.label], scores[entry["label"]]) if compared else None
        entry["pareto"] = pareto
    candidates = [
        Candidate(
            e["label"],
            e["method"],
            e["alpha"],
            e["safety"]["rate"],
            e["over_refusal"]["rate"],
            e["derived"]["utility_drop"],
            e["derived"]["over_refusal_increase"],
        )
        for e in entries
        if e["kind"] == "merged"
    ]
    if main_method is None:
        main_method = next((v.method for v in variants if v.kind == "merged"), None)
    if progress is not None:
        progress("evaluate: done", 1.0)
    return {
        "schema_version": SCHEMA_VERSION,
        "judge": judge.name,
        "utility_metric": metric.name,
        "utility_higher_is_better": metric.higher_is_better,
        "max_new_tokens": spec.max_new_tokens,
        "limit": spec.limit,
        "utility_tolerance": spec.utility_tolerance,
        "over_refusal_tolerance": spec.over_refusal_tolerance,
        "reference": reference.label,
        "datasets": data.summary(),
        "models": entries,
        "recommended": recommend(candidates, main_method, spec.utility_tolerance, spec.over_refusal_tolerance),
        "samples": {label: r.samples for label, r in results.items()},
    }


def write_atomic(path: Path, payload: bytes) -> None:
    """Write `payload` to a temporary file beside `path`, then rename it over `path` (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as handle:
        handle.write(payload)
        temporary = Path(handle.name)
    try:
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def write_outputs(metrics: dict, json_path: str | Path, png_path: str | Path | None) -> None:
    """metrics.json (strict JSON: no NaN/Infinity) and, if `png_path` is given, the plot; each written atomically."""
    payload = json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
    write_atomic(Path(json_path), payload)
    if png_path is not None:
        write_atomic(Path(png_path), render_png(metrics))


def run_evaluation(
    base_model: str,
    variants: Sequence[Variant],
    spec: EvaluationSpec,
    device: str,
    dtype: str,
    out_dir: str | Path,
    progress: Progress | None = None,
    *,
    main_method: str | None = None,
) -> dict:
    """Load the data, then the base model, evaluate the variants and write `out_dir`/metrics.json and
    `out_dir`/plot.png; returns the metrics dict."""
    data = EvaluationData.load(spec)
    judge = make_judge(spec.judge, device=str(resolve_device(device)))
    model, tokenizer = load_base_model(base_model, device, dtype)
    metrics = evaluate_variants(
        model, tokenizer, variants, spec, progress, data=data, judge=judge, main_method=main_method
    )
    out = Path(out_dir)
    write_outputs(metrics, out / "metrics.json", out / "plot.png")
    return metrics
