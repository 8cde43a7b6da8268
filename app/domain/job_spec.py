"""A merge request as the core's `MergeSpec`: the one translation from what a client asked for to what
`sstmerge_core.pipeline.run_merge` runs. The API calls it at submit time on placeholder paths (the core's own
checks), the worker with the job's fetched inputs."""

from __future__ import annotations

from collections.abc import Callable

from sstmerge_core.jobspec import AdapterInput, EvaluationSettings, EvaluationSpec, MergeSpec

from .requests import AdapterRef, MergeRequest


def build_spec(
    body: MergeRequest,
    base_model: str,
    adapter_path: Callable[[str], str],
    dataset_path: Callable[[str], str],
    **overrides,
) -> MergeSpec:
    """The core `MergeSpec` for a request, with ids turned into local paths by the given functions."""

    def adapter(ref: AdapterRef) -> AdapterInput:
        return AdapterInput(path=adapter_path(ref.adapter_id), weight=ref.weight, name=ref.adapter_id)

    def data(ident: str | None) -> str | None:
        return dataset_path(ident) if ident else None

    evaluation = None
    if body.evaluation:
        ev = body.evaluation
        evaluation = EvaluationSpec(
            harmful=dataset_path(ev.harmful_dataset_id),
            benign=dataset_path(ev.benign_dataset_id),
            utility_eval=dataset_path(ev.utility_eval_dataset_id),
            **ev.model_dump(include=set(EvaluationSettings.model_fields)),
        )
    return MergeSpec(
        base_model=base_model,
        utility=[adapter(r) for r in body.utility_adapters],
        safety=[adapter(body.safety_adapter)],
        utility_data=data(body.utility_dataset_id),
        safety_data=data(body.safety_dataset_id),
        method=body.method,
        params=body.params,
        compare_with=body.compare_with,
        evaluation=evaluation,
        **overrides,
    )
