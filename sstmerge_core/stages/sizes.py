"""The sizes a job's cost depends on (`progress.JobSizes`), read off its loaded inputs: model parameters and
layers, examples and their token counts, modules and their shapes, α values and evaluated models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..cache import FisherCache
from ..data import Example
from ..progress import CalibrationSize, EvaluationSize, JobSizes, MergeRun, ModelSize, PassSize, RepairSize
from ..prompting import chat_prompt, encode
from .fisher import fisher_cache_keys
from .inputs import LoadedInputs
from .merging import merge_plan

SAMPLE = 32  # examples tokenized per set to estimate its mean length


def _sample(examples: Sequence[Example]) -> list[Example]:
    step = max(len(examples) // SAMPLE, 1)
    return list(examples[::step][:SAMPLE])


def mean_tokens(tokenizer, examples: Sequence[Example], max_length: int, *, responses: bool = True) -> float:
    """Mean token count (chat template included) over an even sample of `examples`."""
    sample = _sample(examples)
    if not sample:
        return 0.0
    if responses:
        counts = [len(encode(tokenizer, e.prompt, e.response, max_length).input_ids) for e in sample]
    else:
        counts = [
            min(len(tokenizer(chat_prompt(tokenizer, e.prompt), add_special_tokens=False)["input_ids"]), max_length)
            for e in sample
        ]
    return sum(counts) / len(counts)


def model_size(model) -> ModelSize:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    return ModelSize(params=sum(p.numel() for p in model.parameters()), layers=int(layers))


def pass_size(tokenizer, examples: Sequence[Example], config, *, cached: bool = False) -> PassSize:
    """A Fisher pass: the examples with responses are scored as they are; the others are first continued by the
    model for `continuation_tokens` tokens. A cached pass only reads its factors."""
    if cached:
        return PassSize(examples=len(examples), tokens=0.0, cached=True)
    continued = [e for e in examples if e.response is None]
    prompt_tokens = mean_tokens(tokenizer, continued, config.max_length, responses=False)
    answered = [e for e in examples if e.response is not None]
    answered_tokens = mean_tokens(tokenizer, answered, config.max_length)
    continued_tokens = min(prompt_tokens + config.continuation_tokens, config.max_length)
    tokens = (len(answered) * answered_tokens + len(continued) * continued_tokens) / max(len(examples), 1)
    return PassSize(
        examples=len(examples),
        tokens=tokens,
        generated=len(continued),
        new_tokens=config.continuation_tokens,
        prompt_tokens=prompt_tokens,
        batch_size=config.batch_size,
        label_samples=config.label_samples,
    )


def evaluation_size(loaded: LoadedInputs, models: int) -> EvaluationSize | None:
    evaluation = loaded.evaluation
    if evaluation is None:
        return None
    from ..evaluation.metrics import UTILITY_METRICS

    data, spec = evaluation.data, evaluation.spec
    generate_utility = UTILITY_METRICS[spec.utility_metric].needs_generation
    prompts = [*data.harmful, *data.benign, *(data.utility if generate_utility else [])]
    return EvaluationSize(
        models=models,
        generated=len(prompts),
        scored=0 if generate_utility else len(data.utility),
        prompt_tokens=mean_tokens(loaded.tokenizer, prompts, 4096, responses=False),
        scored_tokens=0.0 if generate_utility else mean_tokens(loaded.tokenizer, data.utility, 1024),
        max_new_tokens=spec.max_new_tokens,
        batch_size=generation_batch(loaded.model, spec.batch_size),
    )


def generation_batch(model, batch_size) -> int:
    """The evaluation's batch size; for "auto", the most it may take (the memory budget can make batches smaller)."""
    if isinstance(batch_size, int):
        return batch_size
    from ..evaluation.batching import batch_cap

    return batch_cap(model)


def cached_passes(loaded: LoadedInputs) -> set[str]:
    """The Fisher passes ("utility", "safety") whose factors the cache already holds."""
    if not loaded.fisher_data:
        return set()
    cache = FisherCache(Path(loaded.spec.cache_dir) / "fisher" if loaded.spec.cache_dir else None)
    return {role for role, key in fisher_cache_keys(loaded).items() if cache.path(key).is_file()}


def repair_size(loaded: LoadedInputs, models: int) -> RepairSize | CalibrationSize | None:
    """The repair step's passes: prompts per set, their length, and the (layer, position) candidates scored (the
    calibration step: its answers and training steps)."""
    repair = loaded.repair
    if repair is None:
        return None
    from .calibration import CalibrationInputs, calibration_size

    if isinstance(repair, CalibrationInputs):
        return calibration_size(repair, loaded.tokenizer, models)
    from ..data import Example
    from ..repair.residual import post_instruction_length

    data = repair.data
    prompts = [Example(p) for p in [*data.harmful, *data.harmless, *data.borderline]]
    plan = repair.step.plan(repair.params, model_size(loaded.model).layers, post_instruction_length(loaded.tokenizer))
    return RepairSize(
        models=models,
        prompts=min(plan.max_samples, max(len(data.harmful), len(data.harmless), len(data.borderline))),
        prompt_tokens=mean_tokens(loaded.tokenizer, prompts, 4096, responses=False),
        candidates=plan.candidates,
        batch_size=plan.batch_size,
    )


def job_sizes(loaded: LoadedInputs) -> JobSizes:
    spec = loaded.spec
    runs = [MergeRun(len(params.alphas), method.info.dense) for method, params, _ in merge_plan(spec)]
    references = 1 + (1 if spec.utility else 0) + 1  # base, before, safety
    files = len(spec.utility) + len(spec.safety) + len(loaded.fisher_data) + (3 if loaded.evaluation else 0)
    cached = cached_passes(loaded)
    return JobSizes(
        model=model_size(loaded.model),
        model_loaded=loaded.model_was_loaded,
        files=files,
        shapes=[m.shape for m in loaded.modules.values()],
        merges=runs,
        fisher={
            role: pass_size(loaded.tokenizer, data.examples, data.config, cached=role in cached)
            for role, data in loaded.fisher_data.items()
        },
        evaluation=evaluation_size(loaded, references + sum(run.alphas for run in runs)),
        repair=repair_size(loaded, sum(run.alphas for run in runs)),
    )
