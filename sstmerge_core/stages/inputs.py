"""Loading: the job's adapters, Fisher data, evaluation sets and base model, checked against each other and
held in one frozen `LoadedInputs`. Bad inputs fail here, before any data pass."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..adapters import load_adapter
from ..cache import model_fingerprint
from ..data import Example, examples_sha256, file_sha256, load_examples
from ..errors import InputError
from ..fisher import Estimator, FisherConfig
from ..jobspec import DATA_INPUTS, AdapterInput, EvaluationSpec, MergeSpec
from ..merge import WeightedAdapter, module_inputs
from ..methods.base import MergeMethod, ModuleInputs
from ..methods.catalog import CommonParams, FisherParams
from ..methods.registry import get_method
from ..modeling import ModelRef, load_base_model, resolve_device
from ..specfile import InputNames, display_name
from .merging import merge_plan
from .repair import load_repair_inputs


class ModelCache:
    """Keeps the last loaded base model (a worker reuses it for the next job on the same model)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple | None = None

    @staticmethod
    def _cache_key(ref: ModelRef, device: str, dtype: str) -> tuple:
        return (str(ref), device, dtype)

    def holds(self, ref: ModelRef, device: str, dtype: str) -> bool:
        return self._key == self._cache_key(ref, device, dtype)

    def get(self, ref: ModelRef, device: str, dtype: str):
        key = self._cache_key(ref, device, dtype)
        if key != self._key:
            self._key, self._value = None, None  # free the old model before loading the next
            self._value = load_base_model(ref, device=device, dtype=dtype)
            self._key = key
        return self._value


@dataclass(frozen=True)
class FisherData:
    """The examples of one Fisher pass, how the pass runs, and the sha256 of the file they came from."""

    examples: tuple[Example, ...]
    config: FisherConfig
    file_sha256: str

    def summary(self) -> dict:
        """{"n", "sha256" (of the examples used), "estimator"}, as recorded in merge_report.json."""
        return {
            "n": len(self.examples),
            "sha256": examples_sha256(list(self.examples)),
            "estimator": self.config.estimator,
        }


@dataclass(frozen=True)
class EvaluationInputs:
    """The held-out evaluation sets and the refusal judge, loaded before the model."""

    spec: EvaluationSpec
    data: Any  # evaluation.runner.EvaluationData
    judge: Any  # evaluation.judges.Judge
    file_sha256: Mapping[str, str]  # "harmful", "benign", "utility_eval"


@dataclass(frozen=True)
class LoadedInputs:
    """Everything a job reads, loaded and checked: the stages after loading never touch the input files again."""

    spec: MergeSpec
    method: MergeMethod
    params: CommonParams
    ref: ModelRef
    model_fingerprint: str
    model: Any
    tokenizer: Any
    model_was_loaded: bool  # False when the model cache already held it
    utility: tuple[WeightedAdapter, ...]
    safety: tuple[WeightedAdapter, ...]
    modules: Mapping[str, ModuleInputs]  # by module name, sorted
    fisher_data: Mapping[str, FisherData]  # "utility", "safety"; empty when no method of the job reads data
    evaluation: EvaluationInputs | None
    repair: Any = None  # stages.repair.RepairInputs when the job repairs its merges

    @property
    def fan_in_fan_out(self) -> bool:
        return (self.utility or self.safety)[0].adapter.fan_in_fan_out

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    @property
    def adapters(self) -> tuple[tuple[str, AdapterInput, WeightedAdapter], ...]:
        """(role, as given, as loaded) for every input adapter."""
        return tuple(
            (role, given, loaded)
            for role, given_list, loaded_list in (
                ("utility", self.spec.utility, self.utility),
                ("safety", self.spec.safety, self.safety),
            )
            for given, loaded in zip(given_list, loaded_list, strict=True)
        )


def fisher_configs(
    params: FisherParams, utility_estimator: Estimator, safety_estimator: Estimator
) -> tuple[FisherConfig, FisherConfig]:
    """The utility and safety pass settings of a method's parameters."""
    common = dict(
        max_samples=params.max_samples,
        max_length=params.max_length,
        batch_size=params.batch_size,
        continuation_tokens=params.continuation_tokens,
        label_samples=params.label_samples,
        seed=params.seed,
    )
    return FisherConfig(estimator=utility_estimator, **common), FisherConfig(estimator=safety_estimator, **common)


def sample_examples(path: str, config: FisherConfig) -> list[Example]:
    """The examples of a Fisher data set: all of them, or a seeded uniform subset of `max_samples` (file order
    kept), so that a file grouped by kind is not cut to its first kinds."""
    examples = load_examples(path, require_response=config.estimator == "empirical")
    if len(examples) <= config.max_samples:
        return examples
    keep = sorted(random.Random(config.seed).sample(range(len(examples)), config.max_samples))
    return [examples[i] for i in keep]


def fisher_params(spec: MergeSpec) -> FisherParams | None:
    """The data-pass settings of the job: those of its first method (own or compared) that reads data, if any."""
    # a method that reads data takes FisherParams (methods/catalog.py)
    return next((cast(FisherParams, params) for method, params, _ in merge_plan(spec) if method.needs_fisher), None)


def load_fisher_data(spec: MergeSpec, params: FisherParams) -> dict[str, FisherData]:
    """Utility and safety examples with the settings of their passes (estimators from the method's params)."""
    missing = [
        flag for flag, path in (("utility_data", spec.utility_data), ("safety_data", spec.safety_data)) if not path
    ]
    if missing:
        readers = [method.name for method, _, _ in merge_plan(spec) if method.needs_fisher]
        raise InputError(f"method {readers[0]!r} needs {' and '.join(missing)}")
    assert spec.utility_data is not None and spec.safety_data is not None
    u_config, s_config = fisher_configs(
        params, getattr(params, "utility_fisher", "sampled"), getattr(params, "safety_fisher", "empirical")
    )
    return {
        role: FisherData(tuple(sample_examples(path, config)), config, file_sha256(Path(path)))
        for role, path, config in (("utility", spec.utility_data, u_config), ("safety", spec.safety_data, s_config))
    }


def load_evaluation(spec: MergeSpec, names: InputNames | None = None) -> EvaluationInputs:
    """The evaluation sets and judge, refusing sets that share prompts with the merge data (they must be held out).
    The judge is named as the caller names its classifier (`names`), so that no server path reaches a document."""
    from ..evaluation.judges import make_judge
    from ..evaluation.runner import EvaluationData

    evaluation = spec.evaluation
    assert evaluation is not None, "called for a job with an evaluation"
    data = EvaluationData.load(evaluation)
    merge_files = {key: getattr(spec, key) for key in DATA_INPUTS}
    merge_prompts = {key: {e.prompt.strip() for e in load_examples(path)} for key, path in merge_files.items() if path}
    for name, examples in (("harmful", data.harmful), ("benign", data.benign), ("utility_eval", data.utility)):
        rows = [
            i for i, e in enumerate(examples, start=1) if any(e.prompt.strip() in p for p in merge_prompts.values())
        ]
        if rows:
            inputs = [k for k, p in merge_prompts.items() if any(examples[i - 1].prompt.strip() in p for i in rows)]
            shown = ", ".join(map(str, rows[:5])) + (", …" if len(rows) > 5 else "")
            raise InputError(
                f"evaluation set {name!r} shares {len(rows)} prompt(s) with the merge or repair data "
                f"({', '.join(inputs)}; rows {shown} of {name!r}); evaluation prompts must be held out"
            )
    files = {name: file_sha256(Path(getattr(evaluation, name))) for name in ("harmful", "benign", "utility_eval")}
    judge = make_judge(evaluation.judge, device=str(resolve_device(spec.device)))
    kind, sep, target = judge.name.partition(":")
    if sep:
        model, mark, label = target.partition("#")
        judge.name = f"{kind}:{display_name(model, names)}{mark}{label}"
    return EvaluationInputs(evaluation, data, judge, files)


def _load_adapters(items: list[AdapterInput]) -> tuple[WeightedAdapter, ...]:
    return tuple(WeightedAdapter(load_adapter(i.path, name=i.name), i.weight) for i in items)


def load_inputs(
    spec: MergeSpec, *, model_cache: ModelCache | None = None, names: InputNames | None = None
) -> LoadedInputs:
    """Adapters, data, evaluation sets (cheap, so that bad files fail first), then the base model; every adapter
    module is checked to exist in the model with its shape."""
    method = get_method(spec.method)
    params = spec.method_params()
    utility, safety = _load_adapters(spec.utility), _load_adapters(spec.safety)
    pass_params = fisher_params(spec)
    fisher_data = load_fisher_data(spec, pass_params) if pass_params is not None else {}
    evaluation = load_evaluation(spec, names) if spec.evaluation is not None else None
    repair = load_repair_inputs(spec, judge=evaluation.judge if evaluation is not None else None)
    ref = ModelRef.parse(spec.base_model)
    cache = model_cache or ModelCache()
    cached = cache.holds(ref, spec.device, spec.dtype)
    model, tokenizer = cache.get(ref, spec.device, spec.dtype)
    return LoadedInputs(
        spec=spec,
        method=method,
        params=params,
        ref=ref,
        model_fingerprint=model_fingerprint(ref.name_or_path, ref.revision),
        model=model,
        tokenizer=tokenizer,
        model_was_loaded=not cached,
        utility=utility,
        safety=safety,
        modules=module_inputs(list(utility), list(safety), model),
        fisher_data=fisher_data,
        evaluation=evaluation,
        repair=repair,
    )
