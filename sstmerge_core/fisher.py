"""K-FAC Fisher factors restricted to a low-rank span (SPEC §3 step 3).

For each hooked module with bases R_in (d_in × q) and R_out (d_out × p), over the scored positions t:
    A = E_t[(R_inᵀ x_t)(R_inᵀ x_t)ᵀ]   (q × q, x_t the module input)
    G = E_t[(R_outᵀ δ_t)(R_outᵀ δ_t)ᵀ]  (p × p, δ_t = ∂(Σ_t' −log p(y_t'))/∂(module output at t))
Labels y are the dataset's responses (`empirical`) or drawn from the model's own predictive
distribution (`sampled`, the true Fisher). Only activations carry gradients: parameters are frozen and
the graph is rooted at the input embeddings, so no weight gradient is ever formed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .data import Example
from .errors import InputError
from .prompting import Encoded, chat_prompt, encode

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

    def __init__(self, model: nn.Module, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
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
def frozen_parameters(model: nn.Module) -> Iterator[None]:
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
def continuations(model: nn.Module, tokenizer, prompts: list[str], config: FisherConfig) -> list[list[int]]:
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
    out = model.generate(
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


def encode_examples(model, tokenizer, examples: list[Example], config: FisherConfig) -> list[Encoded]:
    """Token ids with the scored region: dataset responses, or model continuations (sampled, no response)."""
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
    return [e for e in encoded if len(e.input_ids) > e.response_start]


def _logit_positions(scored: torch.Tensor) -> torch.Tensor:
    """Sequence indices whose logits are needed: the union of scored positions over the batch."""
    return torch.nonzero(scored.any(dim=0)).flatten()


def collect_factors(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: FisherConfig,
    progress: Progress | None = None,
) -> dict[str, KFACFactors]:
    """One pass over `examples`: the restricted K-FAC factors of every module in `bases` (SPEC §3 step 3).

    `bases[name] = (R_in, R_out)`. Loss per batch: Σ over scored positions of −log p(y_t | prefix),
    with y the next response token (empirical) or y ~ p(· | prefix) (sampled; `label_samples` draws).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        items = encode_examples(model, tokenizer, examples[: config.max_samples], config)
        if not items:
            raise InputError("no example has a scored token (empty responses or max_length too small)")
        items.sort(key=lambda e: len(e.input_ids))  # length-bucketing keeps padding low
        bases = {
            k: (R_in.to(device, torch.float32), R_out.to(device, torch.float32)) for k, (R_in, R_out) in bases.items()
        }
        with frozen_parameters(model), SpanHooks(model, bases) as hooks:
            for done in range(0, len(items), config.batch_size):
                batch = items[done : done + config.batch_size]
                ids, attention, scored = pad_batch(batch, tokenizer.pad_token_id, device)
                positions = _logit_positions(scored)
                hooks.mask = scored
                logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=positions).logits
                logits = logits[scored[:, positions]].float()  # (N × V), N scored positions
                for draw in range(config.label_samples):
                    if config.estimator == "sampled":
                        with torch.no_grad():
                            labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
                    else:
                        labels = ids[:, 1:][scored[:, :-1]]
                    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
                    loss.backward(retain_graph=draw + 1 < config.label_samples)
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
