"""Evaluate a base model and its adapter variants on harmful, benign and utility prompts → metrics.json.

The base model is loaded once; each variant is applied with `modeling.lora_forward` (forward hooks adding
Σ_i w_i ΔW_i x to each module's output, as PEFT runs an unmerged adapter; removed afterwards, also on
errors), so no copy of the weights is made and the weights are never changed. Every model keeps its
per-prompt outcomes; rates are reported on the whole sets and on the search and report splits
(`splits`), and the recommendation is chosen on the search split (`recommend`). The layout of the
result (`contracts.Metrics`) is documented in README.md next to this file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast, get_args

from ..adapters import LoraFactors, load_adapter
from ..contracts.metrics import (
    SCHEMA_VERSION,
    Metrics,
    ModelEntry,
    NoPick,
    Numbers,
    Pick,
    PricedPick,
    Recommended,
    VariantKind,
)
from ..data import Example, examples_sha256, load_examples
from ..errors import InputError
from ..files import write_atomic
from ..jobspec import AdapterInput, EvaluationSpec
from ..memory import release_freed_memory, resident_bytes
from ..modeling import load_base_model, lora_forward, resolve_device
from .derived import Scores, derived_metrics, pareto_flags
from .generation import OnTexts, generate, response_nll
from .judges import Judge, make_judge, settled_refusal_rule
from .metrics import UTILITY_METRICS, UtilityMetric, summarize_utility
from .outcomes import Outcomes
from .plot import render_png
from .pricing import (
    SAFETY_TARGETS,
    WARNING_BELOW,
    WARNING_TARGET,
    SplitSizes,
    near_ties,
    price_list,
    tolerance_change,
    warning_text,
)
from .recommend import Candidate, Recommendation, Tolerances, recommend
from .splits import SPLIT_NAMES, Splits
from .stats import Rate

log = logging.getLogger(__name__)

SAMPLES_PER_SET = 3
COMPARED_KINDS = ("safety", "merged", "baseline")
"""Kinds that get derived metrics against the reference (before, else base)."""
CANDIDATE_KINDS = ("merged", "baseline")
"""Kinds the recommendation chooses from."""
PRICE_RULE = (
    "for each safety target, the evaluated merge with search-split safety ≥ the target and utility_drop ≤ {utility:g} "
    "of lowest search-split over-refusal (over-refusal tolerance and cap not applied)"
)
Progress = Callable[[str, float], None]
"""progress(stage, fraction of the whole evaluation done); it may raise (e.g. `Cancelled`) to stop."""
Watch = Callable[[str, list], None]
"""watch(set name, outcomes so far): after each batch of "harmful" and "benign" (refused or not, per row answered
so far) and of a generated "utility" set (scores); it may raise to stop the model's evaluation (a pruned trial)."""


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

    def splits(self, seed: int, report_fraction: float) -> Splits:
        """The search/report split of each set (`splits` module)."""
        prompts = {
            "harmful": [e.prompt for e in self.harmful],
            "benign": [e.prompt for e in self.benign],
            "utility_eval": [e.prompt for e in self.utility],
        }
        return Splits.of(prompts, seed, report_fraction)

    def subset(self, splits: Splits, split: str) -> EvaluationData:
        """The rows of one split ("search" or "report") of every set, in file order."""
        return EvaluationData(
            harmful=[self.harmful[i] for i in splits.rows("harmful", split)],
            benign=[self.benign[i] for i in splits.rows("benign", split)],
            utility=[self.utility[i] for i in splits.rows("utility_eval", split)],
        )


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
    """What one evaluated model scored, before comparison with the others; `outcomes` per prompt."""

    safety: Rate
    over_refusal: Rate
    utility: dict
    samples: dict
    outcomes: Outcomes

    def scores(self, higher_is_better: bool) -> Scores:
        return scores_of(self.safety.to_dict(), self.over_refusal.to_dict(), self.utility, higher_is_better)

    @classmethod
    def from_outcomes(cls, outcomes: Outcomes, metric: UtilityMetric, samples: dict | None = None) -> ModelResult:
        """The result whose rates are those of `outcomes` (e.g. outcomes kept from an earlier run)."""
        return cls(
            Rate.count(list(outcomes.harmful)),
            Rate.count(list(outcomes.benign)),
            summarize_utility(metric, list(outcomes.utility)),
            samples or {},
            outcomes,
        )


def scores_of(safety: dict, over_refusal: dict, utility: dict, higher_is_better: bool) -> Scores:
    """The `Scores` of a metrics block, utility oriented so that higher is better."""
    value = utility["value"] if higher_is_better else -utility["value"]
    return Scores(safety["rate"], over_refusal["rate"], value)


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
    watch: Watch | None = None,
) -> ModelResult:
    """Scores the model as it is now: refusal rates on harmful and benign prompts and utility.
    `tick(set_name)` returns the per-batch progress callback for that set; `watch` sees the outcomes as they come."""

    def watched(name: str, outcome: Callable[[list[int], list[str]], list]) -> OnTexts | None:
        """The per-batch callback that hands `watch` the set's outcomes so far (none without a watch)."""
        if watch is None:
            return None
        seen: list = []

        def on_texts(rows: list[int], completions: list[str]) -> None:
            seen.extend(outcome(rows, completions))
            watch(name, seen)

        return on_texts

    refusal_rates, refusals, samples = {}, {}, {}
    for name, examples in (("harmful", data.harmful), ("benign", data.benign)):
        prompts = [e.prompt for e in examples]

        def judged(rows: list[int], texts: list[str], prompts: list[str] = prompts) -> list[bool]:
            return judge.judge([prompts[i] for i in rows], texts)

        completions = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
            on_batch=tick(name),
            decided=settled_refusal_rule(judge),
            on_texts=watched(name, judged),
        )
        refused = judge.judge(prompts, completions)
        refusals[name] = refused
        refusal_rates[name] = Rate.count(refused)
        samples[name] = _refusal_samples(examples, completions, refused)
    utility_completions: list[str] | list[None]
    if metric.score is not None:  # metric.needs_generation
        score = metric.score
        references = [cast(str, e.response) for e in data.utility]  # loaded with require_response=True
        utility_completions = generate(
            model,
            tokenizer,
            [e.prompt for e in data.utility],
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
            on_batch=tick("utility"),
            on_texts=watched("utility", lambda rows, texts: [score(c, references[i]) for i, c in zip(rows, texts)]),
        )
        # utility examples are loaded with require_response=True
        scores = [score(c, cast(str, e.response)) for c, e in zip(utility_completions, data.utility)]
    else:
        utility_completions = [None] * len(data.utility)
        scores = response_nll(model, tokenizer, data.utility, batch_size=spec.batch_size, on_batch=tick("utility"))
    samples["utility"] = [
        {"prompt": e.prompt, "completion": c, "reference": e.response, "score": s}
        for e, c, s in list(zip(data.utility, utility_completions, scores))[:SAMPLES_PER_SET]
    ]
    return ModelResult(
        refusal_rates["harmful"],
        refusal_rates["benign"],
        summarize_utility(metric, scores),
        samples,
        Outcomes.of(refusals["harmful"], refusals["benign"], scores),
    )


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


def _split_blocks(result: ModelResult, splits: Splits, metric: UtilityMetric) -> dict:
    """{"search": {...}, "report": {...}}: the model's rates on each split (null for an empty split)."""
    return {
        split: result.outcomes.subset(
            splits.rows("harmful", split), splits.rows("benign", split), splits.rows("utility_eval", split)
        ).summary(metric)
        for split in SPLIT_NAMES
    }


def _add_derived(entries: list[dict], reference: dict, higher_is_better: bool) -> None:
    """`derived` on the whole sets and in each split block, against the reference model."""

    def scores(block: dict) -> Scores:
        return scores_of(block["safety"], block["over_refusal"], block["utility"], higher_is_better)

    for entry in entries:
        compared = entry["kind"] in COMPARED_KINDS
        entry["derived"] = derived_metrics(scores(reference), scores(entry)) if compared else None
        for split, block in entry["splits"].items():
            if block is not None:
                reference_block = reference["splits"][split]
                block["derived"] = derived_metrics(scores(reference_block), scores(block)) if compared else None


def _numbers(entry: ModelEntry, split: str) -> Numbers | None:
    """A model's rates and gains on one split (for the recommendation block)."""
    block = getattr(entry.splits, split)
    if block is None:
        return None
    derived = block.derived
    return Numbers(
        safety=block.safety,
        over_refusal=block.over_refusal,
        utility=block.utility,
        safety_gain=derived.safety_gain if derived else None,
        utility_drop=derived.utility_drop if derived else None,
        over_refusal_increase=derived.over_refusal_increase if derived else None,
        refusal_tax=derived.refusal_tax if derived else None,
    )


def _candidate(entry: ModelEntry) -> Candidate | None:
    block = entry.splits.search
    if block is None:
        return None
    derived = block.derived
    assert derived is not None, "merged and baseline entries are compared with the reference"
    return Candidate(
        entry.label,
        entry.method,
        entry.alpha,
        block.safety.rate,
        block.over_refusal.rate,
        derived.safety_gain,
        derived.utility_drop,
        derived.over_refusal_increase,
    )


def _search_sizes(entries: list[ModelEntry], utility_bounded: bool) -> SplitSizes | None:
    block = next((e.splits.search for e in entries if e.splits.search is not None), None)
    if block is None:
        return None
    utility = block.utility.n if utility_bounded else None
    return SplitSizes(block.safety.n, block.over_refusal.n, utility)


def recommendation_block(
    entries: list[ModelEntry], main_method: str | None, tolerances: Tolerances, *, utility_bounded: bool = True
) -> Recommended:
    """metrics.recommended: the rule of `recommend` applied to the search-split numbers of every merged and
    baseline entry, with the chosen model's and the runner-up's numbers on both splits; beside it the price list,
    the near-tie notes and the low-safety warning of `pricing` (picked on the search split, reported on the report
    split). `utility_bounded`: utility scores lie in [0, 1], so that one utility prompt moves the mean by 1/n."""
    by_label = {e.label: e for e in entries}
    candidates = [c for e in entries if e.kind in CANDIDATE_KINDS and (c := _candidate(e)) is not None]
    safety = next((e.splits.search for e in entries if e.kind == "safety" and e.splits.search is not None), None)
    cap = safety.over_refusal.rate if safety is not None else None
    result: Recommendation = recommend(
        candidates, main_method=main_method, tolerances=tolerances, safety_over_refusal=cap
    )

    def described(candidate: Candidate | None) -> Pick | None:
        if candidate is None:
            return None
        entry = by_label[candidate.label]
        return Pick(
            label=candidate.label,
            method=candidate.method,
            alpha=candidate.alpha,
            search=_numbers(entry, "search"),
            report=_numbers(entry, "report"),
        )

    def priced(target: float, pick: Candidate | None) -> PricedPick | NoPick:
        found = described(pick)
        if found is None:
            return NoPick(target=target, label=None, method=None, alpha=None)
        return PricedPick(target=target, **dict(found))

    chosen = described(result.chosen)
    sizes = _search_sizes([by_label[c.label] for c in candidates], utility_bounded)
    prices = [priced(target, pick) for target, pick in price_list(candidates, tolerances, main_method, SAFETY_TARGETS)]
    change = tolerance_change(candidates, tolerances, cap, WARNING_TARGET)
    report_safety = chosen.report.safety.rate if chosen and chosen.report else None
    warning = (
        warning_text(report_safety, change, tolerances, candidates=candidates, cap=cap, target=WARNING_TARGET)
        if report_safety is not None and report_safety < WARNING_BELOW
        else None
    )
    return Recommended.model_validate(
        {
            "label": result.chosen.label if result.chosen else None,
            "method": result.chosen.method if result.chosen else None,
            "alpha": result.chosen.alpha if result.chosen else None,
            "rule": result.rule,
            "reason": result.reason,
            "tolerances": {**tolerances.to_dict(), "over_refusal_at_most_safety_adapter": cap},
            "chosen_on": "search",
            "qualified": result.qualified,
            "candidates": result.candidates,
            "search": chosen.search if chosen else None,
            "report": chosen.report if chosen else None,
            "runner_up": described(result.runner_up),
            "near_tie": near_ties(candidates, result, tolerances, cap, sizes) if sizes is not None else [],
            "warning": warning,
            "price_list": {
                "rule": PRICE_RULE.format(utility=tolerances.utility_drop),
                "chosen_on": "search",
                "reported_on": "report",
                "targets": prices,
            },
            "to_reach_safety": {"target": WARNING_TARGET, "change": change},
        }
    )


def compare_models(
    variants: Sequence[Variant],
    results: dict[str, ModelResult],
    provenance: dict[str, list[dict]],
    splits: Splits,
    metric: UtilityMetric,
    *,
    main_method: str | None,
    tolerances: Tolerances,
) -> tuple[list[ModelEntry], Recommended]:
    """The metrics.json entries of every variant (whole-set and per-split rates, derived metrics against the
    reference, Pareto flags, per-prompt outcomes) and the recommendation block, from the models' results."""
    reference = _check_variants(variants)
    entries = []
    for variant in variants:
        result = results[variant.label]
        entry = _model_entry(variant, provenance.get(variant.label, []), result)
        entry["splits"] = _split_blocks(result, splits, metric)
        entry["outcomes"] = result.outcomes.to_dict()
        entries.append(entry)
    reference_entry = next(e for e in entries if e["label"] == reference.label)
    _add_derived(entries, reference_entry, metric.higher_is_better)
    scores = [results[e["label"]].scores(metric.higher_is_better) for e in entries]
    for entry, pareto in zip(entries, pareto_flags(scores)):
        entry["pareto"] = pareto
    if main_method is None:
        main_method = next((v.method for v in variants if v.kind == "merged"), None)
    models = [ModelEntry.model_validate(entry) for entry in entries]
    return models, recommendation_block(models, main_method, tolerances, utility_bounded=metric.higher_is_better)


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
) -> Metrics:
    """Evaluate every variant on the loaded base `model` and return its metrics.json.

    `data` and `judge` may be passed pre-loaded (to fail fast before loading a model); by default they come
    from `spec`. Derived metrics compare each safety/merged/baseline variant with the reference ("before",
    else "base"), on the whole sets and on each split. The recommendation is chosen on the search split among
    the merged and baseline variants; ties favour `main_method` (default: the method of the first merged
    variant). The model's weights are never changed.
    """
    reference = _check_variants(variants)
    if data is None:
        data = EvaluationData.load(spec)
    if judge is None:
        judge = make_judge(spec.judge, device=str(model.device))
    metric = UTILITY_METRICS[spec.utility_metric]
    splits = data.splits(spec.split_seed, spec.report_fraction)
    counter = _ProgressCounter(progress, data.size * len(variants))

    results, provenance = {}, {}
    for variant in variants:
        started = time.perf_counter()
        release_freed_memory()  # what the previous model freed, so that the resident size stays flat model by model
        resident = resident_bytes()
        deltas, provenance[variant.label] = variant_deltas(variant)
        with lora_forward(model, deltas):
            result = evaluate_model(model, tokenizer, data, judge, metric, spec, counter.stage(variant.label))
        modules = len(deltas)
        del deltas
        results[variant.label] = result
        log.info(
            "evaluated variant",
            extra={
                "label": variant.label,
                "modules": modules,
                "safety": round(result.safety.rate, 4),
                "over_refusal": round(result.over_refusal.rate, 4),
                metric.name: round(result.utility["value"], 4),
                "seconds": round(time.perf_counter() - started, 1),
                "rss_mib_at_start": round(resident / 2**20, 1) if resident is not None else None,
            },
        )

    tolerances = Tolerances(spec.utility_tolerance, spec.over_refusal_tolerance)
    entries, recommended = compare_models(
        variants, results, provenance, splits, metric, main_method=main_method, tolerances=tolerances
    )
    if progress is not None:
        progress("evaluate: done", 1.0)
    return Metrics.model_validate(
        {
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
            "splits": splits.to_dict(),
            "models": entries,
            "recommended": recommended,
            "samples": {label: r.samples for label, r in results.items()},
        }
    )


def metrics_bytes(metrics: Metrics) -> bytes:
    """The bytes of metrics.json: strict JSON (no NaN/Infinity), indented, UTF-8, one final newline."""
    return json.dumps(metrics.model_dump(mode="json"), indent=2, ensure_ascii=False, allow_nan=False).encode() + b"\n"


def write_outputs(metrics: Metrics, json_path: str | Path, png_path: str | Path | None) -> None:
    """metrics.json and, if `png_path` is given, the plot; each written atomically."""
    payload = metrics_bytes(metrics)
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
) -> Metrics:
    """Load the data, then the base model, evaluate the variants and write `out_dir`/metrics.json and
    `out_dir`/plot.png; returns the metrics."""
    data = EvaluationData.load(spec)
    judge = make_judge(spec.judge, device=str(resolve_device(device)))
    model, tokenizer = load_base_model(base_model, device, dtype)
    metrics = evaluate_variants(
        model, tokenizer, variants, spec, progress, data=data, judge=judge, main_method=main_method
    )
    out = Path(out_dir)
    write_outputs(metrics, out / "metrics.json", out / "plot.png")
    return metrics
