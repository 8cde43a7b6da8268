"""One merge job end to end: load → Fisher passes (cached) → merge every module for every α → write the
PEFT adapters, the report and the model cards → optional evaluation. Shared by the CLI, the Python
API and the service's workers; output is written to a staging folder and moved into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import load_adapter, save_adapter
from .cache import FisherCache, cache_key, model_fingerprint
from .data import Example, examples_sha256, load_examples
from .errors import Cancelled, InputError
from .fisher import FisherConfig
from .jobspec import AdapterInput, MergeSpec
from .merge import WeightedAdapter, fisher_factors, merge_modules, module_inputs
from .methods.base import ModuleResult
from .methods.catalog import CommonParams, FisherParams, parse_params
from .methods.registry import get_method
from .modeling import ModelRef, load_base_model, resolve_device
from .report import alpha_dirname, build_report, model_card

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, float], None]

# Share of the job's progress bar taken by each stage (normalised over the stages a job runs).
STAGE_WEIGHTS = {
    "loading": 0.05,
    "fisher_utility": 0.35,
    "fisher_safety": 0.15,
    "merging": 0.1,
    "writing": 0.05,
    "evaluating": 0.3,
}


@dataclass
class MergeOutcome:
    summary: dict
    out_dir: Path
    adapter_dirs: dict[float, Path]
    report_path: Path
    metrics_path: Path | None = None
    plot_path: Path | None = None


class ModelCache:
    """Keeps the last loaded base model (a worker reuses it for the next job on the same model)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple | None = None

    def get(self, ref: ModelRef, device: str, dtype: str):
        key = (str(ref), device, dtype)
        if key != self._key:
            self._key, self._value = None, None  # free the old model before loading the next
            self._value = load_base_model(ref, device=device, dtype=dtype)
            self._key = key
        return self._value


@dataclass
class _Tracker:
    """Stage bookkeeping: progress fraction over the stages this job runs, cancellation, timings."""

    stages: list[str]
    progress: ProgressFn | None
    should_cancel: Callable[[], bool] | None
    timings: dict = field(default_factory=dict)
    _current: str | None = None
    _started: float = 0.0

    def _offset(self, stage: str) -> tuple[float, float]:
        total = sum(STAGE_WEIGHTS[s] for s in self.stages)
        before = sum(STAGE_WEIGHTS[s] for s in self.stages[: self.stages.index(stage)])
        return before / total, STAGE_WEIGHTS[stage] / total

    def start(self, stage: str) -> None:
        self.finish()
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled before stage {stage}")
        self._current, self._started = stage, time.perf_counter()
        self.report(0.0)

    def report(self, fraction: float) -> None:
        if self.progress is not None and self._current is not None:
            start, width = self._offset(self._current)
            self.progress(self._current, round(min(1.0, start + width * fraction), 6))

    def finish(self) -> None:
        if self._current is not None:
            self.timings[self._current] = round(time.perf_counter() - self._started, 3)
            self.report(1.0)
            self._current = None


def _load_adapters(items: list[AdapterInput]) -> list[WeightedAdapter]:
    return [WeightedAdapter(load_adapter(i.path, name=i.name), i.weight) for i in items]


def _adapter_info(items: list[WeightedAdapter]) -> list[dict]:
    return [
        {
            "name": w.adapter.name,
            "sha256": w.adapter.sha256,
            "weight": w.weight,
            "rank": max(f.rank for f in w.adapter.modules.values()),
            "modules": len(w.adapter.modules),
        }
        for w in items
    ]


def fisher_configs(
    params: FisherParams, utility_estimator: str, safety_estimator: str
) -> tuple[FisherConfig, FisherConfig]:
    common = dict(
        max_samples=params.max_samples,
        max_length=params.max_length,
        batch_size=params.batch_size,
        continuation_tokens=params.continuation_tokens,
        label_samples=params.label_samples,
        seed=params.seed,
    )
    return FisherConfig(estimator=utility_estimator, **common), FisherConfig(estimator=safety_estimator, **common)


def _load_data(path: str, config: FisherConfig) -> list[Example]:
    """The examples of a Fisher data set: all of them, or a seeded uniform subset of `max_samples` (file order
    kept), so that a file grouped by kind is not cut to its first kinds."""
    examples = load_examples(path, require_response=config.estimator == "empirical")
    if len(examples) <= config.max_samples:
        return examples
    keep = sorted(random.Random(config.seed).sample(range(len(examples)), config.max_samples))
    return [examples[i] for i in keep]


def write_adapters(
    staging: Path,
    subdir: str,
    by_alpha: dict[float, dict[str, ModuleResult]],
    report: dict,
    *,
    base_model: str,
    revision: str | None,
    fan_in_fan_out: bool,
) -> dict[float, Path]:
    """One PEFT folder per α under staging/subdir (+ model card and that folder's copy of the report)."""
    dirs = {}
    for alpha, results in by_alpha.items():
        folder = staging / subdir / alpha_dirname(alpha)
        modules = {name: r.factors for name, r in results.items() if r.factors is not None}
        if not modules:
            raise InputError(f"the merge at α={alpha:g} is zero on every module; nothing to write")
        save_adapter(folder, modules, base_model=base_model, revision=revision, fan_in_fan_out=fan_in_fan_out)
        (folder / "merge_report.json").write_text(json.dumps(report, indent=2))
        (folder / "README.md").write_text(model_card(report, alpha))
        dirs[alpha] = Path(subdir) / alpha_dirname(alpha)
    return dirs


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to out_dir; an older out_dir is swapped away, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_merge(
    spec: MergeSpec,
    out_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    model_cache: ModelCache | None = None,
) -> MergeOutcome:
    """Run the job described by `spec`, writing into `out_dir` atomically; returns where everything is.

    Layout: `alpha-{α}/` (PEFT adapter + README.md + merge_report.json per α), `merge_report.json`,
    `baselines/{method}/alpha-{α}/` for `compare_with`, and `metrics.json` + `plot.png` when evaluated.
    Raises `InputError` for bad inputs and `Cancelled` when `should_cancel()` turns true between stages.
    """
    out_dir = Path(out_dir).resolve()
    method = get_method(spec.method)
    params = spec.method_params()
    stages = [
        "loading",
        *(["fisher_utility", "fisher_safety"] if method.needs_fisher else []),
        "merging",
        "writing",
        *(["evaluating"] if spec.evaluation else []),
    ]
    track = _Tracker(stages, progress, should_cancel)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        track.start("loading")
        utility, safety = _load_adapters(spec.utility), _load_adapters(spec.safety)
        info = {
            "base_model": spec.base_model,
            "utility_adapters": _adapter_info(utility),
            "safety_adapters": _adapter_info(safety),
            "data": {},
        }
        data = _load_merge_data(spec, params, info) if method.needs_fisher else None
        evaluation = _evaluation_inputs(spec) if spec.evaluation else None
        ref = ModelRef.parse(spec.base_model)
        model, tokenizer = (model_cache or ModelCache()).get(ref, spec.device, spec.dtype)
        inputs = module_inputs(utility, safety, model)

        fisher, fisher_info = None, None
        if method.needs_fisher:
            fisher, fisher_info = _fisher(spec, params, model, tokenizer, inputs, utility, safety, ref, data, track)

        track.start("merging")
        by_alpha = merge_modules(method, inputs, params, fisher)
        baselines = {
            name: merge_modules(get_method(name), inputs, _baseline_params(name, params))
            for name in spec.compare_with
            if name != spec.method
        }

        track.start("writing")
        report = build_report(
            method=method,
            params=params.model_dump(),
            inputs=info,
            by_alpha=by_alpha,
            timings=track.timings,
            fisher=fisher_info,
        )
        fan = utility[0].adapter.fan_in_fan_out if utility else safety[0].adapter.fan_in_fan_out
        write = dict(base_model=ref.name_or_path, revision=ref.revision, fan_in_fan_out=fan)
        adapter_dirs = write_adapters(staging, ".", by_alpha, report, **write)
        for name, results in baselines.items():
            sub = build_report(
                method=get_method(name),
                params=_baseline_params(name, params).model_dump(),
                inputs=info,
                by_alpha=results,
                timings={},
                fisher=None,
            )
            write_adapters(staging, f"baselines/{name}", results, sub, **write)

        metrics_path = plot_path = None
        if spec.evaluation is not None:
            track.start("evaluating")
            metrics = _evaluate(model, tokenizer, spec, params, staging, list(baselines), track, evaluation)
            metrics_path, plot_path = staging / "metrics.json", staging / "plot.png"
            report["evaluation"] = {"recommended": metrics.get("recommended")}
        track.finish()
        report["timings_s"] = track.timings
        (staging / "merge_report.json").write_text(json.dumps(report, indent=2))
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = {
        "method": method.name,
        "alphas": params.alphas,
        "modules": report["summary"].get("modules"),
        "adapters": {f"{a:g}": str(d) for a, d in adapter_dirs.items()},
        "timings_s": track.timings,
        "diagnostics": report["summary"],
        "compare_with": list(baselines),
    }
    if spec.evaluation is not None:
        summary["recommended"] = report["evaluation"]["recommended"]
    return MergeOutcome(
        summary=summary,
        out_dir=out_dir,
        adapter_dirs={a: out_dir / d for a, d in adapter_dirs.items()},
        report_path=out_dir / "merge_report.json",
        metrics_path=out_dir / metrics_path.name if metrics_path else None,
        plot_path=out_dir / plot_path.name if plot_path and (out_dir / plot_path.name).exists() else None,
    )


def evaluation_variants(spec: MergeSpec, params: CommonParams, root: Path, baselines: list[str]) -> list:
    """Base, before (base + utility), safety (base + safety), the merged adapter per α and each baseline per α."""
    from .evaluation.runner import Variant

    variants = [Variant("base", "base")]
    if spec.utility:
        variants.append(Variant("before", "before", tuple(spec.utility)))
    variants.append(Variant("safety", "safety", tuple(spec.safety)))
    method_params = params.model_dump(exclude={"alphas"})
    for alpha in params.alphas:
        variants.append(
            Variant(
                f"{spec.method}@{alpha:g}",
                "merged",
                str(root / alpha_dirname(alpha)),
                method=spec.method,
                alpha=alpha,
                params=method_params,
            )
        )
    for name in baselines:
        for alpha in params.alphas:
            variants.append(
                Variant(
                    f"{name}@{alpha:g}",
                    "baseline",
                    str(root / "baselines" / name / alpha_dirname(alpha)),
                    method=name,
                    alpha=alpha,
                    params=_baseline_params(name, params).model_dump(exclude={"alphas"}),
                )
            )
    return variants


def _evaluation_inputs(spec: MergeSpec) -> tuple:
    """The evaluation sets and judge, loaded up front so that a bad file fails the job before any data pass."""
    from .evaluation.judges import make_judge
    from .evaluation.runner import EvaluationData

    data = EvaluationData.load(spec.evaluation)
    merge_prompts = {
        e.prompt.strip() for path in (spec.utility_data, spec.safety_data) if path for e in load_examples(path)
    }
    for name, examples in (("harmful", data.harmful), ("benign", data.benign), ("utility_eval", data.utility)):
        shared = sum(e.prompt.strip() in merge_prompts for e in examples)
        if shared:
            raise InputError(
                f"evaluation set {name!r} shares {shared} prompt(s) with the merge data; "
                "evaluation prompts must be held out"
            )
    return data, make_judge(spec.evaluation.judge, device=str(resolve_device(spec.device)))


def _evaluate(
    model,
    tokenizer,
    spec: MergeSpec,
    params: CommonParams,
    staging: Path,
    baselines: list[str],
    track: _Tracker,
    evaluation: tuple,
) -> dict:
    """Evaluate every variant on the held-out sets; writes metrics.json and plot.png into `staging`."""
    from .evaluation.runner import evaluate_variants, write_outputs

    def progress(_stage: str, fraction: float) -> None:
        if track.should_cancel is not None and track.should_cancel():
            raise Cancelled("cancelled during evaluation")
        track.report(fraction)

    data, judge = evaluation
    metrics = evaluate_variants(
        model,
        tokenizer,
        evaluation_variants(spec, params, staging, baselines),
        spec.evaluation,
        progress,
        data=data,
        judge=judge,
        main_method=spec.method,
    )
    write_outputs(metrics, staging / "metrics.json", staging / "plot.png")
    return metrics


def _baseline_params(name: str, params: CommonParams) -> CommonParams:
    """A comparison method runs with the job's α sweep, rank cap and seed, and its own defaults otherwise."""
    return parse_params(name, {"alphas": params.alphas, "max_rank": params.max_rank, "seed": params.seed})


def _load_merge_data(spec: MergeSpec, params, info: dict) -> dict:
    """Utility and safety examples with their Fisher configs; records sizes and hashes in `info`."""
    u_config, s_config = fisher_configs(params, params.utility_fisher, params.safety_fisher)
    data = {
        "utility": (_load_data(spec.utility_data, u_config), u_config),
        "safety": (_load_data(spec.safety_data, s_config), s_config),
    }
    for role, (examples, config) in data.items():
        info["data"][role] = {"n": len(examples), "sha256": examples_sha256(examples), "estimator": config.estimator}
    return data


def _fisher(spec, params, model, tokenizer, inputs, utility, safety, ref, data, track):
    """Both Fisher passes through the factor cache (keyed by everything the factors depend on)."""
    (u_data, u_config), (s_data, s_config) = data["utility"], data["safety"]
    hashes = {role: examples_sha256(examples) for role, (examples, _) in data.items()}
    cache = FisherCache(Path(spec.cache_dir) / "fisher" if spec.cache_dir else None)
    common = dict(
        model=model_fingerprint(ref.name_or_path, ref.revision),
        dtype=spec.dtype,
        utility=[(w.adapter.sha256, w.weight) for w in utility],
        safety=[(w.adapter.sha256, w.weight) for w in safety],
    )
    keys = {
        "utility": cache_key(**common, data=hashes["utility"], config=u_config.__dict__),
        "safety": cache_key(**common, data=hashes["safety"], config=s_config.__dict__),
    }

    def cached(kind, compute):
        track.start(f"fisher_{kind}")
        return cache.get_or_compute(keys[kind], compute)

    def progress(kind, done, total):
        track.report(done / max(total, 1))

    fisher = fisher_factors(
        model, tokenizer, inputs, u_data, s_data, u_config, s_config, cached=cached, progress=progress
    )
    hits = {kind: keys[kind] in cache.hits for kind in keys}
    return fisher, {"cache_hits": hits, "cache_keys": keys, "damping": params.damping}
