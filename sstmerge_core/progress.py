"""How far a merge job has got, told truthfully: each stage weighs what it is expected to cost, computed from the
job's sizes with a few per-unit constants, and advances by the work it has done.

Cost model, in seconds on the reference machine (the fraction only needs the ratios between stages right):

    one model call on T tokens     t(T) = c_call + L·c_layer + P·T·c_token   (L layers, P parameters)
    Fisher pass, per batch of b    (1 + c_backward)·t(b·tokens) + M·c_hook (M hooked modules), plus, for rows
                                   without a response, one prefill and `continuation_tokens` decode steps t(b)
    generating N tokens, batch b   t(b·prompt_tokens) + N·(c_decode·(c_call + L·c_layer) + P·b·c_token)
    evaluation, per model          generation on the harmful and benign prompts (and the utility prompts, or one
                                   forward per utility example for the NLL metric) + applying the model's ΔW
    merging                        modules × α × (c_module + c_dense·d_out·d_in·min(d_out, d_in) for dense methods)
    loading                        c_model + P·c_load (only the input files when a worker already holds the model)

The constants of `CPU` were fitted with `bench/progress_costs.py` on the project's 2-core machine; `CUDA` scales
the model-pass constants by an assumed GPU speed-up (not yet measured on a GPU), leaving the CPU-side merge
constants alone, since merges run on the CPU tensors of the adapters.

Nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .errors import Cancelled

ProgressFn = Callable[[str, float], None]
"""progress(stage, fraction of the whole job done, in [0, 1], never decreasing)."""


@dataclass(frozen=True)
class CostConstants:
    """Seconds per unit of work (see the module docstring)."""

    c_call: float = 3.0e-3  # per model call (Python, masks, generation bookkeeping)
    c_layer: float = 2.0e-4  # per layer and model call (kernel launches, Python per layer)
    c_token: float = 1.2e-11  # per parameter and token of a forward pass
    c_backward: float = 1.6  # activation-only backward, relative to a forward
    c_decode: float = 1.8  # fixed cost of a decode step relative to a forward call's (cache, logits processors)
    c_hook: float = 3.0e-4  # per hooked module and Fisher batch (projections and outer products)
    c_module: float = 1.0e-3  # per module and α of any merge (SST's projection, concatenation, bookkeeping)
    c_dense: float = 2.5e-10  # per d_out·d_in·min(d_out, d_in) of a dense merge + SVD, per α
    c_apply: float = 2.0e-9  # per d_out·d_in of forming and adding one ΔW (evaluation, Fisher at M + ΔU)
    c_model: float = 0.5  # loading a model: fixed part (config, tokenizer, model class)
    c_load: float = 1.5e-8  # loading a model: per parameter
    c_file: float = 2.5e-3  # per file read or written (adapters, data sets, reports)
    c_plot: float = 0.5  # rendering the plot

    def scaled_model_passes(self, speedup: float) -> CostConstants:
        """The same constants on a device `speedup` times faster at model passes (per-call overheads stay)."""
        return replace(self, c_layer=self.c_layer / speedup, c_token=self.c_token / speedup)


CPU = CostConstants()
CUDA = CPU.scaled_model_passes(40.0)


def constants_for(device: str) -> CostConstants:
    """The constants of a torch device name (`cpu`, `cuda`, `cuda:1`, …)."""
    return CUDA if device.startswith("cuda") else CPU


@dataclass(frozen=True)
class ModelSize:
    params: int
    layers: int


@dataclass(frozen=True)
class PassSize:
    """One Fisher data pass."""

    examples: int
    tokens: float  # mean tokens per example (prompt + response)
    generated: int = 0  # examples the model first continues (sampled estimator, no response)
    new_tokens: int = 0  # tokens of each such continuation
    prompt_tokens: float = 0.0  # mean prompt tokens of those examples
    batch_size: int = 8
    label_samples: int = 1
    cached: bool = False  # the factors are in the cache: the pass only reads a file


@dataclass(frozen=True)
class EvaluationSize:
    """Evaluation of `models` models on the same prompts."""

    models: int
    generated: int  # prompts answered by generation, per model (harmful + benign [+ utility])
    scored: int  # utility examples scored by a forward pass only (NLL metric), per model
    prompt_tokens: float
    scored_tokens: float
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class RepairSize:
    """The repair step on `models` merged models: per model, forward passes over the fit halves of three prompt sets
    (activations) and, for each of `candidates` directions and once without, over their select halves."""

    models: int
    prompts: int  # prompts per set used, fit and select halves together
    prompt_tokens: float
    candidates: int
    batch_size: int


@dataclass(frozen=True)
class CalibrationSize:
    """The calibration step: the `before` model's answers to `generated` prompts once, then on each of `models`
    merged models `steps` training steps (forward + backward) on `batch_size` rows of `tokens` tokens."""

    models: int
    steps: int
    batch_size: int
    tokens: float
    generated: int
    prompt_tokens: float
    new_tokens: int


@dataclass(frozen=True)
class MergeRun:
    """One method's merge: how many α and whether it works on dense ΔW."""

    alphas: int
    dense: bool = False


@dataclass(frozen=True)
class JobSizes:
    """What a job's cost depends on."""

    model: ModelSize
    model_loaded: bool  # loading read the model (False: a worker already held it)
    files: int  # adapter folders and data files read at loading
    shapes: Sequence[tuple[int, int]]  # (d_out, d_in) of every merged module
    merges: Sequence[MergeRun]  # the job's method first, then the compare_with methods
    fisher: Mapping[str, PassSize] = field(default_factory=dict)  # "utility", "safety"
    evaluation: EvaluationSize | None = None
    repair: RepairSize | CalibrationSize | None = None


@dataclass(frozen=True)
class StageCost:
    """Expected seconds of a stage: `lead` passes before its first unit of work is reported, `body` is spread
    over its reported work (a Fisher pass reports batches, after its continuations)."""

    lead: float = 0.0
    body: float = 0.0

    @property
    def total(self) -> float:
        return self.lead + self.body

    def fraction(self, done: float, total: float) -> float:
        """Fraction of the stage done after `done` of `total` units of its body."""
        if self.total <= 0:
            return 1.0
        share = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
        return (self.lead + self.body * share) / self.total


def _call(model: ModelSize, tokens: float, k: CostConstants) -> float:
    return k.c_call + model.layers * k.c_layer + model.params * tokens * k.c_token


def _generation(model: ModelSize, prompts: int, prompt_tokens: float, new_tokens: int, batch: int, k) -> float:
    """Prefill and `new_tokens` decode steps over the prompts, in batches of `batch`."""
    step_overhead = k.c_decode * (k.c_call + model.layers * k.c_layer)
    total = 0.0
    for rows in _batches(prompts, batch):
        total += _call(model, rows * prompt_tokens, k) + new_tokens * (step_overhead + model.params * rows * k.c_token)
    return total


def _batches(n: int, size: int) -> list[int]:
    """Rows per batch when n items are cut into batches of `size`."""
    full, rest = divmod(n, max(size, 1))
    return [size] * full + ([rest] if rest else [])


def fisher_cost(model: ModelSize, size: PassSize, hooked: int, k: CostConstants) -> StageCost:
    """Continuations (lead) and the forward + backward batches (body) of one Fisher pass over `hooked` modules."""
    if size.cached:
        return StageCost(lead=k.c_file)
    lead = _generation(model, size.generated, size.prompt_tokens, size.new_tokens, size.batch_size, k)
    body = sum(
        _call(model, rows * size.tokens, k) * (1 + k.c_backward * size.label_samples) + hooked * k.c_hook
        for rows in _batches(size.examples, size.batch_size)
    )
    return StageCost(lead=lead, body=body)


def evaluation_cost(model: ModelSize, size: EvaluationSize, shapes: Sequence[tuple[int, int]], k) -> StageCost:
    per_model = _generation(model, size.generated, size.prompt_tokens, size.max_new_tokens, size.batch_size, k)
    per_model += sum(_call(model, rows * size.scored_tokens, k) for rows in _batches(size.scored, size.batch_size))
    per_model += sum(2 * d_out * d_in for d_out, d_in in shapes) * k.c_apply + 2 * k.c_file
    return StageCost(body=size.models * per_model)


def merge_cost(shapes: Sequence[tuple[int, int]], runs: Sequence[MergeRun], k: CostConstants) -> StageCost:
    dense = sum(d_out * d_in * min(d_out, d_in) for d_out, d_in in shapes)
    body = sum(run.alphas * (len(shapes) * k.c_module + (dense * k.c_dense if run.dense else 0.0)) for run in runs)
    return StageCost(body=body)


def repair_cost(model: ModelSize, size: RepairSize, k: CostConstants) -> StageCost:
    half = (size.prompts + 1) // 2
    sets = 3 * sum(_call(model, rows * size.prompt_tokens, k) for rows in _batches(half, size.batch_size))
    return StageCost(body=size.models * sets * (1 + size.candidates + 1))


def calibration_cost(model: ModelSize, size: CalibrationSize, k: CostConstants) -> StageCost:
    answers = _generation(model, size.generated, size.prompt_tokens, size.new_tokens, 16, k)
    step = _call(model, size.batch_size * size.tokens, k) * (1 + k.c_backward)
    return StageCost(body=answers + size.models * size.steps * step)


def step_cost(model: ModelSize, size: RepairSize | CalibrationSize, k: CostConstants) -> StageCost:
    """The repair stage's cost, whichever step it runs."""
    if isinstance(size, CalibrationSize):
        return calibration_cost(model, size, k)
    return repair_cost(model, size, k)


def stage_costs(sizes: JobSizes, k: CostConstants = CPU) -> dict[str, StageCost]:
    """Expected cost of every stage the job runs, in the order they run."""
    costs = {
        "loading": StageCost(
            lead=(k.c_model + sizes.model.params * k.c_load if sizes.model_loaded else 0.0) + sizes.files * k.c_file
        )
    }
    for role in ("utility", "safety"):
        if role in sizes.fisher:
            costs[f"fisher_{role}"] = fisher_cost(sizes.model, sizes.fisher[role], len(sizes.shapes), k)
    apply = sum(d_out * d_in for d_out, d_in in sizes.shapes) * k.c_apply
    if sizes.fisher:  # ΔU is added to the model for the passes and taken out again
        costs["fisher_utility"] = replace(costs["fisher_utility"], lead=costs["fisher_utility"].lead + 2 * apply)
    costs["merging"] = merge_cost(sizes.shapes, sizes.merges, k)
    if sizes.repair is not None:
        costs["repairing"] = step_cost(sizes.model, sizes.repair, k)
    adapters = sum(run.alphas for run in sizes.merges)
    costs["writing"] = StageCost(body=adapters * (2 * k.c_file + apply / 10))
    if sizes.evaluation is not None:
        costs["evaluating"] = evaluation_cost(sizes.model, sizes.evaluation, sizes.shapes, k)
    costs["reporting"] = StageCost(lead=(3 * adapters + 2) * k.c_file + (k.c_plot if sizes.evaluation else 0.0))
    return costs


class JobProgress:
    """Stage bookkeeping of one job: the cost-weighted fraction done, cancellation checks and timings.

    `begin(stage)` ends the previous stage and checks `should_cancel` (raising `Cancelled`); `advance(done,
    total)` reports work within the stage and checks for cancellation at most every `cancel_check_s`. The plan
    (`plan(costs)`) may be set after the first stage has begun, once the job's sizes are known; until then the
    fraction stays 0.
    """

    def __init__(
        self,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
        *,
        cancel_check_s: float = 2.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._progress, self._should_cancel = progress, should_cancel
        self._cancel_check_s, self._clock = cancel_check_s, clock
        self._costs: dict[str, StageCost] = {}
        self._timings: dict[str, float] = {}
        self._stage: str | None = None
        self._within = 0.0
        self._started = 0.0
        self._last_check = -math.inf
        self._reported = 0.0

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per finished stage (a copy)."""
        return dict(self._timings)

    @property
    def costs(self) -> dict[str, StageCost]:
        return dict(self._costs)

    @property
    def stage(self) -> str | None:
        return self._stage

    def plan(self, costs: Mapping[str, StageCost]) -> None:
        self._costs = dict(costs)
        self._report()

    def fraction(self) -> float:
        """Σ cost of the finished stages + the current stage's share, over Σ cost of all planned stages."""
        total = sum(cost.total for cost in self._costs.values())
        if total <= 0:
            return 0.0
        done = sum(self._costs[s].total for s in self._timings if s in self._costs)
        if self._stage is not None and self._stage in self._costs:
            done += self._costs[self._stage].total * self._within
        return min(done / total, 1.0)

    def begin(self, stage: str) -> None:
        self.finish()
        self._check_cancel(f"cancelled before stage {stage}")
        self._stage, self._within, self._started = stage, 0.0, self._clock()
        self._report()

    def advance(self, done: float, total: float) -> None:
        """`done` of `total` units of the current stage's work are done."""
        if self._stage is None:
            return
        cost = self._costs.get(self._stage, StageCost(body=1.0))
        self._within = max(self._within, cost.fraction(done, total))
        if self._clock() - self._last_check >= self._cancel_check_s:
            self._check_cancel(f"cancelled during stage {self._stage}")
        self._report()

    def check_cancel(self) -> None:
        """A cancellation check within the current stage without reported work (the continuations that lead a
        Fisher pass), at most every `cancel_check_s` like `advance`'s."""
        if self._stage is not None and self._clock() - self._last_check >= self._cancel_check_s:
            self._check_cancel(f"cancelled during stage {self._stage}")

    def finish(self) -> None:
        """End the current stage (if any) and record its time."""
        if self._stage is None:
            return
        self._timings[self._stage] = round(self._clock() - self._started, 3)
        self._stage, self._within = None, 0.0
        self._report()

    def _check_cancel(self, message: str) -> None:
        self._last_check = self._clock()
        if self._should_cancel is not None and self._should_cancel():
            raise Cancelled(message)

    def _report(self) -> None:
        if self._progress is None:
            return
        stage = self._stage or next(reversed(self._timings), None)
        if stage is None:
            return
        self._reported = max(self._reported, round(self.fraction(), 6))
        self._progress(stage, self._reported)


class RemainingTime:
    """Seconds left, from the fraction done: the total-time estimate elapsed / fraction, smoothed by an
    exponential moving average with time constant `tau_s` (a jump at a stage boundary is eased in)."""

    def __init__(self, tau_s: float = 15.0, min_fraction: float = 0.005, clock: Callable[[], float] = time.monotonic):
        self._clock, self._tau, self._min_fraction = clock, tau_s, min_fraction
        self.started = clock()
        self._total: float | None = None
        self._last: float | None = None

    def elapsed(self) -> float:
        return self._clock() - self.started

    def update(self, fraction: float) -> None:
        now = self._clock()
        elapsed = now - self.started
        if fraction < self._min_fraction or elapsed <= 0:
            return
        estimate = elapsed / min(fraction, 1.0)
        if self._total is None or self._last is None:
            self._total = estimate
        else:
            weight = 1.0 - math.exp(-(now - self._last) / self._tau)
            self._total += weight * (estimate - self._total)
        self._last = now

    def remaining(self) -> float | None:
        """Estimated seconds left now (None until the first estimate)."""
        if self._total is None:
            return None
        return max(self._total - self.elapsed(), 0.0)
