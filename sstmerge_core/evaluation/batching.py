"""How many sequences go into one batch: the most that fit a memory budget, estimated from the model's shape.

Memory model (bytes, e = bytes per element of the model's dtype, per sequence of padded prompt length L):
- generation: 1.25 · kv · (L + max_new_tokens) + prefill(L) + 12 · vocab, with kv = 2 · layers · kv_heads ·
  head_dim · e per token (keys and values; the quarter covers the cache growing by re-allocation, one layer at a
  time), prefill(L) = L · (4 · hidden + 3 · intermediate + heads · L) · e (one layer's transients over the
  prompt) and the last position's logits in float32 with their processing copies (measured on SmolLM2: 5.5 MB
  per sequence of 48 + 48 tokens against 7.4 MB estimated);
- reference NLL (one forward, all logits): L · (12 · vocab + (4 · hidden + 3 · intermediate + heads · L) · e);
- a backward pass (Fisher): layers · (8 · hidden + 4 · intermediate) · e saved activations per token.
Budget: on CUDA 80% of the device's free memory; on CPU half the model's weight bytes (at least 256 MiB, at
most a quarter of the available RAM), so that a job's working memory stays a fraction of its weights.
Batches are formed longest prompt first, each as large as the budget allows for its longest member, up to
a cap (CPU: `CPU_BATCH_CAP`, where measured throughput stops growing; CUDA: `CUDA_BATCH_CAP`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

BatchSize = int | Literal["auto"]
CPU_BATCH_CAP = 64
"""Throughput of greedy generation on CPU stops growing past this batch (bench/eval_throughput.py, bench/RESULTS.md)."""
CUDA_BATCH_CAP = 256
MIN_CPU_BUDGET = 256 * 2**20
CPU_BUDGET_OF_WEIGHTS = 0.5
CPU_BUDGET_OF_AVAILABLE = 0.25
CUDA_BUDGET_OF_FREE = 0.8


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that decide its activation and cache memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    element_bytes: int

    @classmethod
    def of(cls, model) -> ModelShape:
        """Read from the model's (text) config; GPT-2 style names (n_layer, n_embd, n_inner, n_head) too."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

        def first(*names: str, default: int | None = None) -> int:
            for name in names:
                value = getattr(config, name, None)
                if value:
                    return int(value)
            if default is None:
                raise ValueError(f"the model config has none of {names}")
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        return cls(
            layers=first("num_hidden_layers", "n_layer"),
            hidden=hidden,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            heads=heads,
            kv_heads=first("num_key_value_heads", default=heads),
            head_dim=first("head_dim", default=hidden // heads),
            vocab=first("vocab_size"),
            element_bytes=next(model.parameters()).element_size(),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.element_bytes

    def layer_bytes_per_token(self, length: int) -> int:
        """One layer's transient activations per token of a length-`length` sequence."""
        return (4 * self.hidden + 3 * self.intermediate + self.heads * length) * self.element_bytes

    @property
    def backward_bytes_per_token(self) -> int:
        """Activations a backward pass keeps per token, over all layers."""
        return self.layers * (8 * self.hidden + 4 * self.intermediate) * self.element_bytes

    def generation_bytes(self, length: int, max_new_tokens: int) -> int:
        """Peak working memory of greedy generation for one sequence with a `length`-token prompt."""
        cache = 5 * self.kv_bytes_per_token * (length + max_new_tokens) // 4
        return cache + length * self.layer_bytes_per_token(length) + 12 * self.vocab

    def nll_bytes(self, length: int) -> int:
        """Peak working memory of one forward pass that keeps every position's logits (float32)."""
        return length * (12 * self.vocab + self.layer_bytes_per_token(length))


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_budget(model) -> int:
    """Bytes a batch may use for activations and caches (module docstring)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(CUDA_BUDGET_OF_FREE * free)
    budget = max(MIN_CPU_BUDGET, int(CPU_BUDGET_OF_WEIGHTS * weight_bytes(model)))
    available = available_ram()
    return budget if available is None else max(1, min(budget, int(CPU_BUDGET_OF_AVAILABLE * available)))


def batch_cap(model) -> int:
    return CUDA_BATCH_CAP if next(model.parameters()).device.type == "cuda" else CPU_BATCH_CAP


def plan_batches(
    lengths: Sequence[int],
    batch_size: BatchSize,
    *,
    bytes_per_sequence: Callable[[int], int] | None = None,
    budget: int | None = None,
    cap: int = CPU_BATCH_CAP,
) -> list[list[int]]:
    """Indices grouped into batches, longest first (fewer pad tokens per batch).

    A number fixes the batch size; "auto" makes each batch the most sequences, at most `cap`, for which
    len(batch) · bytes_per_sequence(length of its longest) ≤ budget (always at least one).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if batch_size != "auto":
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if bytes_per_sequence is None or budget is None:
        raise ValueError("batch_size 'auto' needs bytes_per_sequence and budget")
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        per_sequence = max(1, bytes_per_sequence(lengths[order[start]]))
        size = max(1, min(cap, budget // per_sequence))
        batches.append(order[start : start + size])
        start += size
    return batches
