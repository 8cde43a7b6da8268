"""Fisher pass vs the training floor on SmolLM2-135M-Instruct (issue: Fisher pass ≤ training).

Times, side by side in one process and interleaved, over the same batches:
  fisher     — SST's restricted K-FAC pass (empirical labels; activation gradients only),
  train_lora — a LoRA training forward+backward (r=16, all 7 projection types; grads on LoRA params),
  train_full — a full fine-tuning forward+backward (grads on every parameter).
Prints median and spread of each over repetitions and the ratios fisher / train_*. On a CPU only the
ratios are meaningful (these machines are noisy); absolute times are reported for reference.

    .venv/bin/python -m bench.fisher_vs_training --examples 32 --batch-size 8 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.testbed.assets import smollm2_folder
from sstmerge_core.adapters import load_adapter
from sstmerge_core.data import Example
from sstmerge_core.fisher import FisherConfig, collect_factors, encode_examples, pad_batch
from sstmerge_core.merge import WeightedAdapter, module_inputs, span_bases
from sstmerge_core.modeling import load_base_model
from sstmerge_core.tiny import random_lora


def make_examples(n: int) -> list[Example]:
    """Prompt/response pairs of ~100–150 tokens (their content does not matter for timing)."""
    topics = [
        "photosynthesis",
        "the French revolution",
        "sorting algorithms",
        "black holes",
        "vaccines",
        "the water cycle",
        "compound interest",
        "plate tectonics",
    ]
    return [
        Example(
            f"Explain {topics[i % len(topics)]} to a student in a short paragraph, example {i}.",
            f"Here is a short explanation of {topics[i % len(topics)]}. " * 8,
        )
        for i in range(n)
    ]


def batches(model, tokenizer, examples, config):
    items = sorted(encode_examples(model, tokenizer, examples, config), key=lambda e: len(e.input_ids))
    device = next(model.parameters()).device
    return [
        pad_batch(items[i : i + config.batch_size], tokenizer.pad_token_id, device)
        for i in range(0, len(items), config.batch_size)
    ]


def train_step(model, ids, attention, scored) -> None:
    """One plain training forward+backward: response-token loss, gradients on trainable parameters."""
    logits = model(input_ids=ids, attention_mask=attention).logits
    labels = ids[:, 1:][scored[:, :-1]]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][scored[:, :-1]].float(), labels, reduction="sum")
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import PeftModel

    base = smollm2_folder()
    model, tokenizer = load_base_model(str(base), device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = random_lora(base, Path(tmp) / "safety", seed=0, r=16, lora_alpha=32)
        safety = load_adapter(adapter_dir)
        bases = span_bases(module_inputs([], [WeightedAdapter(safety)], model))
        config = FisherConfig(estimator="empirical", batch_size=args.batch_size, max_length=256)
        examples = make_examples(args.examples)
        data = batches(model, tokenizer, examples, config)
        tokens = sum(int(b[2].sum()) for b in data)
        lora_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)

        def fisher() -> None:
            collect_factors(lora_model.get_base_model(), tokenizer, examples, bases, config)

        def train_lora() -> None:
            lora_model.train()
            for ids, attention, scored in data:
                train_step(lora_model, ids, attention, scored)

        def train_full() -> None:
            with lora_model.disable_adapter():
                for p in model.parameters():
                    p.requires_grad_(True)
                for ids, attention, scored in data:
                    train_step(model, ids, attention, scored)
                for name, p in model.named_parameters():
                    p.requires_grad_("lora_" in name)

        with lora_model.disable_adapter():  # the Fisher pass runs on the plain (utility-merged) model
            fisher()  # warm-up
        runs = {"fisher": [], "train_lora": [], "train_full": []}
        for _ in range(args.repeats):
            with lora_model.disable_adapter():
                runs["fisher"].append(timed(fisher))
            runs["train_lora"].append(timed(train_lora))
            runs["train_full"].append(timed(train_full))

    print(
        f"SmolLM2-135M-Instruct, {len(safety.modules)} LoRA modules (r=16), {args.examples} examples, "
        f"{len(data)} batches of {args.batch_size}, {tokens} scored tokens, {args.threads} threads, "
        f"{args.repeats} repeats"
    )
    print(f"{'pass':<12}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, values in runs.items():
        print(f"{name:<12}{statistics.median(values):>10.2f}{min(values):>8.2f}{max(values):>8.2f}")
    for floor in ("train_lora", "train_full"):
        ratios = [f / t for f, t in zip(runs["fisher"], runs[floor])]
        print(
            f"fisher / {floor}: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
