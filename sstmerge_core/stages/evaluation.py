"""Evaluation: safety, over-refusal and utility of the base model, the references (before, safety) and every
merged adapter, on the held-out sets (`sstmerge_core/evaluation/README.md`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import LoraFactors
from ..contracts.metrics import Metrics, ModelEntry, Recommended
from .inputs import LoadedInputs
from .writing import WrittenAdapters


@dataclass(frozen=True)
class EvaluationResult:
    """The metrics.json of a job (layout in `sstmerge_core/evaluation/README.md`)."""

    metrics: Metrics

    @property
    def recommended(self) -> Recommended:
        return self.metrics.recommended

    def model(self, label: str) -> ModelEntry | None:
        """The entry of the model called `label` (`sst@0.5`, `before`, …), if it was evaluated."""
        return self.metrics.model(label)


def evaluation_variants(loaded: LoadedInputs, root: Path, written: Sequence[WrittenAdapters]) -> list:
    """Base, before (base + utility), safety (base + safety), then every written adapter by method and α."""
    from ..evaluation.runner import Variant
    from ..jobspec import AdapterInput

    spec = loaded.spec
    variants = [Variant("base", "base")]
    if spec.utility:
        variants.append(Variant("before", "before", tuple(spec.utility)))
    variants.append(Variant("safety", "safety", tuple(spec.safety)))
    for adapters in written:
        merged = adapters.merged
        settings = merged.params.model_dump(exclude={"alphas"})
        for alpha, folder in adapters.dirs.items():
            variants.append(
                Variant(
                    merged.label(alpha),
                    merged.role,
                    (AdapterInput(path=str(root / folder)),),
                    method=merged.name,
                    alpha=alpha,
                    params=settings,
                )
            )
    return variants


def evaluate_adapters(
    loaded: LoadedInputs,
    root: Path,
    written: Sequence[WrittenAdapters],
    *,
    progress: Callable[[float, float], None] | None = None,
) -> EvaluationResult:
    """Evaluate every variant (the written adapters read back from `root`); `progress(done, total)` per batch."""
    from ..evaluation.runner import evaluate_variants

    evaluation = loaded.evaluation
    if evaluation is None:
        raise ValueError("the job has no evaluation")
    metrics = evaluate_variants(
        loaded.model,
        loaded.tokenizer,
        evaluation_variants(loaded, root, written),
        evaluation.spec,
        (lambda _stage, fraction: progress(fraction, 1.0)) if progress is not None else None,
        data=evaluation.data,
        judge=evaluation.judge,
        main_method=loaded.spec.method,
    )
    return EvaluationResult(metrics)


def score_updates(
    loaded: LoadedInputs,
    updates: Mapping[str, Mapping[str, LoraFactors]],
    *,
    data: Any = None,
    progress: Callable[[float, float], None] | None = None,
    watch: Callable[[str, list], None] | None = None,
) -> dict[str, Any]:
    """Score models held in memory (label → module updates, e.g. `MergedUpdates.updates(α)`) on `data` (default: the
    job's evaluation sets; a search passes its search split): label → `evaluation.runner.ModelResult`.

    Each model is applied as W + ΔW and taken out again (bit-exactly); nothing is written. `watch` sees every
    model's outcomes batch by batch (`evaluation.runner.Watch`) and may raise to stop.
    """
    from ..evaluation.metrics import UTILITY_METRICS
    from ..evaluation.runner import evaluate_model
    from ..memory import release_freed_memory
    from ..modeling import merged_deltas

    evaluation = loaded.evaluation
    if evaluation is None:
        raise ValueError("the job has no evaluation sets")
    data = data if data is not None else evaluation.data
    metric = UTILITY_METRICS[evaluation.spec.utility_metric]
    total, done = max(data.size * len(updates), 1), 0

    def tick(_set_name: str) -> Callable[[int], None]:
        def advance(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, total)

        return advance

    results = {}
    for label, deltas in updates.items():
        release_freed_memory()  # what the previous model freed (`memory`)
        with merged_deltas(loaded.model, dict(deltas)):
            results[label] = evaluate_model(
                loaded.model, loaded.tokenizer, data, evaluation.judge, metric, evaluation.spec, tick, watch
            )
    return results
