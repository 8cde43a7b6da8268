"""A merge request as the core's `MergeSpec`: the one translation from what a client asked for to what
`sstmerge_core.pipeline.run_merge` runs. The API calls it at submit time on placeholder paths (the core's own
checks), the worker with the job's fetched inputs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from sstmerge_core.jobspec import DATA_INPUTS, AdapterInput, EvaluationSettings, EvaluationSpec, MergeSpec
from sstmerge_core.search.space import search_repair

from .requests import AdapterRef, MergeRequest


def given_data(body: MergeRequest) -> set[str]:
    """The MergeSpec data inputs (`utility_data`, …) the request names a dataset for."""
    return {key for key in DATA_INPUTS if getattr(body, f"{key.removesuffix('_data')}_dataset_id")}


def build_spec(
    body: MergeRequest,
    base_model: str,
    adapter_path: Callable[[str], str],
    dataset_path: Callable[[str], str],
    *,
    judge: str | None = None,
    **overrides: object,
) -> MergeSpec:
    """The core `MergeSpec` for a request, with ids turned into local paths by the given functions and the
    evaluation's judge replaced by `judge` when given (`base_models.resolve_judge`: its classifier as a local path or
    an allowed Hub id). A search with repair data carries the first repair step its data allows, at that step's
    defaults (`search.space.search_repair`; the search draws each step's knobs per trial)."""

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
            **{**ev.model_dump(include=set(EvaluationSettings.model_fields)), **({"judge": judge} if judge else {})},
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
        repair=body.repair or (search_repair(body.search, given_data(body)) if body.search else None),
        harmless_data=data(body.harmless_dataset_id),
        borderline_data=data(body.borderline_dataset_id),
        evaluation=evaluation,
        **overrides,
    )


def public_message(message: str, names: Mapping[str, str], server_dirs: Iterable[Path] = (), limit: int = 2000) -> str:
    """A job's error message as its client may read it: each input path replaced by the name the client knows it by
    (`names`: path -> adapter/dataset id or base model as requested), any other path under `server_dirs` cut to its
    last component, at most `limit` characters."""
    for path in sorted(names, key=len, reverse=True):
        message = message.replace(path, names[path])
    for root in sorted({str(d) for d in server_dirs if str(d) not in ("", "/", ".")}, key=len, reverse=True):
        message = re.sub(re.escape(root) + r"[^\s'\",:;)\]]*", lambda m: f"…/{Path(m.group(0)).name}", message)
    return message[:limit]
