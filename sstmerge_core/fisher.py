"""K-FAC Fisher factors restricted to a low-rank span (docs/method.md, step 3).

For each hooked module with bases R_in (d_in × q) and R_out (d_out × p), over the scored positions t:
    A = E_t[(R_inᵀ x_t)(R_inᵀ x_t)ᵀ]   (q × q, x_t the module input)
    G = E_t[(R_outᵀ δ_t)(R_outᵀ δ_t)ᵀ]  (p × p, δ_t = ∂(Σ_t' −log p(y_t'))/∂(module output at t))
Labels y are the dataset's responses (`empirical`) or drawn from the model's own predictive
distribution (`sampled`, the true Fisher; by inverse CDF from uniforms drawn per batch, so the draws do not
depend on how a batch is split into micro-batches). Only activations carry gradients: parameters are frozen and
the graph is rooted at the input embeddings, so no weight gradient is ever formed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from .data import Example
from .errors import InputError
from .prompting import Encoded, chat_prompt, encode

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
Estimator = Literal["sampled", "empirical"]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FisherConfig:
    """How one data pass is run (what the factor cache keys on, with the model, adapters and data)."""

    estimator: Estimator = "empirical"
    max_samples: int = 1000
    max_length: int = 512
    batch_size: int = 8
    continuation_tokens: int = 32
    label_samples: int = 1
    seed: int = 0


@dataclass
class KFACFactors:
    """Running sums Σ x̃x̃ᵀ and Σ δ̃δ̃ᵀ over n scored positions (and draws); `.A`/`.G` are the means."""

    sum_A: torch.Tensor
    sum_G: torch.Tensor
    n_A: int = 0
    n_G: int = 0

    @property
    def A(self) -> torch.Tensor:
        return self.sum_A / max(self.n_A, 1)

    @property
    def G(self) -> torch.Tensor:
        return self.sum_G / max(self.n_G, 1)


def accumulate_outer(total: torch.Tensor, rows: torch.Tensor) -> None:
    """total += rowsᵀ rows for rows (N × r): Σ_t v_t v_tᵀ in float64."""
    total += (rows.T @ rows).to(total.dtype)


class SpanHooks:
    """Hooks that project module inputs and output gradients onto (R_in, R_out) and accumulate factors.

    Set `mask` (batch × seq, bool) to the scored positions before each forward pass; the hooks gather
    those rows with one precomputed flat index (cheaper than boolean masking in every hook).
    """

    def __init__(self, model: PreTrainedModel, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model = model
        self.bases = bases
        self._mask: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self.factors = {
            name: KFACFactors(
                torch.zeros(R_in.shape[1], R_in.shape[1], dtype=torch.float64, device=R_in.device),
                torch.zeros(R_out.shape[1], R_out.shape[1], dtype=torch.float64, device=R_out.device),
            )
            for name, (R_in, R_out) in bases.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor) -> None:
        self._mask = mask
        self._index = torch.nonzero(mask.flatten()).squeeze(1)

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The scored rows of a (batch × seq × d) tensor, as (N × d)."""
        assert self._index is not None, "set `mask` before a forward pass"
        return tensor.detach().reshape(-1, tensor.shape[-1]).index_select(0, self._index)

    def _forward_hook(self, name: str) -> Callable:
        R_in, R_out = self.bases[name]
        factors = self.factors[name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = self._rows(inputs[0])
            accumulate_outer(factors.sum_A, x.to(R_in.dtype) @ R_in)
            factors.n_A += x.shape[0]
            if output.requires_grad:

                def grad_hook(grad: torch.Tensor) -> None:
                    delta = self._rows(grad)
                    accumulate_outer(factors.sum_G, delta.to(R_out.dtype) @ R_out)
                    factors.n_G += delta.shape[0]

                output.register_hook(grad_hook)

        return hook

    @staticmethod
    def _embedding_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(torch.is_grad_enabled())

    def __enter__(self) -> SpanHooks:
        for name in self.bases:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(self._embedding_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def frozen_parameters(model: PreTrainedModel) -> Iterator[None]:
    """requires_grad=False on every parameter for the duration (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def pad_batch(items: list[Encoded], pad_id: int, device: torch.device):
    """Right-padded (ids, attention_mask, scored) tensors, (b × s) each.

    scored[b, t] is True when the logit at t predicts a response token, i.e. response_start − 1 ≤ t < len − 1.
    """
    length = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    scored = torch.zeros((len(items), length), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        attention[row, :n] = 1
        scored[row, max(item.response_start - 1, 0) : n - 1] = True
    return ids.to(device), attention.to(device), scored.to(device)


@torch.no_grad()
def continuations(model: PreTrainedModel, tokenizer, prompts: list[str], config: FisherConfig) -> list[list[int]]:
    """Sampled model continuations (token ids, cut after the first end-of-sequence) for each prompt."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = [chat_prompt(tokenizer, p) for p in prompts]
        batch = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=True,
            max_length=config.max_length - config.continuation_tokens,
        ).to(device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(  # type: ignore[operator]  # a causal LM: GenerationMixin, not in PreTrainedModel
        **batch,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=config.continuation_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = out[:, batch["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in generated]


def encode_examples(
    model, tokenizer, examples: list[Example], config: FisherConfig, between_batches: Callable[[], None] | None = None
) -> list[Encoded]:
    """Token ids with the scored region: dataset responses, or model continuations (sampled, no response).
    `between_batches()` is called after each batch of continuations (it may raise to stop the pass)."""
    if config.estimator == "empirical" and any(e.response is None for e in examples):
        raise InputError("the empirical Fisher needs a 'response' for every example (or use the sampled estimator)")
    encoded = [encode(tokenizer, e.prompt, e.response, config.max_length) for e in examples]
    missing = [i for i, e in enumerate(examples) if e.response is None]
    for start in range(0, len(missing), config.batch_size):
        chunk = missing[start : start + config.batch_size]
        outputs = continuations(model, tokenizer, [examples[i].prompt for i in chunk], config)
        for i, tokens in zip(chunk, outputs, strict=True):
            prompt_ids = encoded[i].input_ids[: config.max_length - len(tokens)]
            encoded[i] = Encoded(prompt_ids + tokens, len(prompt_ids))
        if between_batches is not None:
            between_batches()
    return [e for e in encoded if len(e.input_ids) > e.response_start]


class ScoredLogits:
    """A forward pre-hook on the output head that keeps only the scored rows of its input, so the head forms
    logits (1 × N × V) for the N scored positions instead of (batch × seq × V): the full-vocabulary logits, their
    softmax and their gradient are the largest tensors of a pass, and most positions are never scored."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.head = model.get_output_embeddings()
        self.index: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None
        self.applied = False

    def _hook(self, _module: nn.Module, inputs: tuple) -> tuple | None:
        hidden = inputs[0]
        if self.index is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != self.shape:
            return None  # an unexpected call: leave it alone (the caller then selects from full logits)
        self.applied = True
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index).unsqueeze(0), *inputs[1:])

    def select(self, scored: torch.Tensor) -> None:
        self.index, self.shape, self.applied = torch.nonzero(scored.flatten()).squeeze(1), tuple(scored.shape), False

    def __enter__(self) -> ScoredLogits:
        self.handle = self.head.register_forward_pre_hook(self._hook) if self.head is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


def max_tokens_per_pass(model: PreTrainedModel) -> int:
    """Tokens one forward+backward may hold: the memory budget of `evaluation.batching` over the activations a
    backward keeps per token plus a scored position's logits, log-softmax, softmax and gradient (float32)."""
    from .evaluation.batching import ModelShape, memory_budget

    shape = ModelShape.of(model)
    return max(1, memory_budget(model) // (shape.backward_bytes_per_token + 16 * shape.vocab))


def micro_batches(items: list[Encoded], max_tokens: int) -> list[list[Encoded]]:
    """Consecutive groups of `items` whose padded size (rows × longest) stays within `max_tokens` (≥ 1 row each).

    The factors are sums over scored positions, so splitting a batch changes no term of them."""
    groups: list[list[Encoded]] = []
    for item in items:
        longest = max([len(item.input_ids), *(len(i.input_ids) for i in groups[-1])]) if groups else 0
        if groups and (len(groups[-1]) + 1) * longest <= max_tokens:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def scored_count(item: Encoded) -> int:
    """Scored positions of one sequence (as `pad_batch` marks them)."""
    return len(item.input_ids) - 1 - max(item.response_start - 1, 0)


def sample_labels(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One label per row of `probs` (N × V) by inverse CDF: the first y with Σ_{y' ≤ y} p(y') > u."""
    cdf = probs.double().cumsum(-1)
    labels = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return labels.clamp_(max=probs.shape[-1] - 1)


def _backward(
    model: PreTrainedModel,
    group: list[Encoded],
    pad_id: int,
    device: torch.device,
    config: FisherConfig,
    hooks: SpanHooks,
    head: ScoredLogits,
    uniforms: torch.Tensor,
) -> None:
    """Forward and backward of one micro-batch: the hooks accumulate its factors. `uniforms` (label_samples × N)
    are the sampled estimator's draws for the group's N scored positions."""
    ids, attention, scored = pad_batch(group, pad_id, device)
    hooks.mask = scored
    head.select(scored)
    logits = model(input_ids=ids, attention_mask=attention).logits
    logits = (logits[0] if head.applied else logits[scored]).float()  # (N × V), N scored positions
    for draw in range(config.label_samples):
        if config.estimator == "sampled":
            with torch.no_grad():
                labels = sample_labels(torch.softmax(logits, -1), uniforms[draw])
        else:
            labels = ids[:, 1:][scored[:, :-1]]
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        loss.backward(retain_graph=draw + 1 < config.label_samples)


def collect_factors(
    model: PreTrainedModel,
    tokenizer,
    examples: list[Example],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: FisherConfig,
    progress: Progress | None = None,
    *,
    max_tokens: int | None = None,
    between_batches: Callable[[], None] | None = None,
) -> dict[str, KFACFactors]:
    """One pass over `examples`: the restricted K-FAC factors of every module in `bases` (docs/method.md, step 3).

    `bases[name] = (R_in, R_out)`. Loss per batch: Σ over scored positions of −log p(y_t | prefix),
    with y the next response token (empirical) or y ~ p(· | prefix) (sampled; `label_samples` draws).
    Each batch of `config.batch_size` examples runs as micro-batches of at most `max_tokens` padded tokens
    (default: `max_tokens_per_pass`), which bounds memory and leaves the sums unchanged; logits are formed
    only at the scored positions. `between_batches()` is called after each batch of continuations, before the
    first `progress` call (a job's cancellation check; it may raise to stop the pass).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    max_tokens = max_tokens or max_tokens_per_pass(model)
    try:
        items = encode_examples(model, tokenizer, examples[: config.max_samples], config, between_batches)
        if not items:
            raise InputError("no example has a scored token (empty responses or max_length too small)")
        items.sort(key=lambda e: len(e.input_ids))  # length-bucketing keeps padding low
        bases = {
            k: (R_in.to(device, torch.float32), R_out.to(device, torch.float32)) for k, (R_in, R_out) in bases.items()
        }
        with frozen_parameters(model), SpanHooks(model, bases) as hooks, ScoredLogits(model) as head:
            for done in range(0, len(items), config.batch_size):
                batch = items[done : done + config.batch_size]
                # the batch's draws come first, so that they do not depend on how it is split into micro-batches
                counts = [scored_count(item) for item in batch]
                uniforms = torch.rand(
                    (config.label_samples, sum(counts)), generator=generator, device=device, dtype=torch.float64
                )
                offsets = [0, *itertools.accumulate(counts)]
                start = 0
                for group in micro_batches(batch, max_tokens):
                    draws = uniforms[:, offsets[start] : offsets[start + len(group)]]
                    _backward(model, group, tokenizer.pad_token_id, device, config, hooks, head, draws)
                    start += len(group)
                if progress is not None:
                    progress(min(done + len(batch), len(items)), len(items))
    finally:
        model.train(was_training)
    log.info(
        "fisher pass done",
        extra={
            "estimator": config.estimator,
            "examples": len(items),
            "modules": len(bases),
            "positions": next(iter(hooks.factors.values())).n_A if hooks.factors else 0,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return hooks.factors
