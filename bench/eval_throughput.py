"""Generation throughput of the evaluation path against a plain batched `model.generate`, side by side.

On the same prompts and model, each repetition runs, interleaved:
- the evaluation path: `evaluation.generation.generate_tokens(..., batch_size)` (chat template, length-sorted
  batches sized by the memory budget with "auto", greedy), on the base model with the merged adapter applied
  the way evaluation applies it (`modeling.lora_forward`) when the testbed's adapters are there;
- plain `model.generate` on the same chat-templated prompts in file order, left-padded, greedy, at each batch
  size of `--plain-batch` — on the *same* model with the adapter merged into the weights (the cheapest way to
  run it), so the comparison charges the evaluation path for its forward hooks.
Generated tokens are counted up to and including the first end-of-sequence token. It prints tokens/s per run
(median and spread over repetitions), the ratio evaluation ÷ best plain batch size (median of per-repetition
ratios; goal ≥ 0.9) and whether the completions are identical. A third run, the evaluation's batches on the
merged weights, separates what the hooks cost from what the batching gains.

    .venv/bin/python -m bench.eval_throughput [--assets bench/assets] [--prompts 96] [--repeats 3] [--threads 2]

With `bench/assets/testbed.json` (SmolLM2-135M-Instruct and its adapters; `python -m bench.testbed.prepare`) it
runs on the held-out harmful and benign prompts; otherwise on a small random Llama.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def plain_generate(model, tokenizer, texts: list[str], batch_size: int, max_new_tokens: int, eos: list[int]):
    """Plain batched greedy generation in the given order: new tokens per prompt, cut after the first eos."""
    import torch

    outputs: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left",
                add_special_tokens=False,
            )  # fmt: skip
            ids = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            for row in ids[:, inputs["input_ids"].shape[1] :].tolist():
                end = next((t + 1 for t, token in enumerate(row) if token in eos), len(row))
                outputs.append(row[:end])
    return outputs


def load_setup(assets: Path, count: int):
    """(model, tokenizer, prompts, adapter deltas or None, description)."""
    from sstmerge_core.evaluation.runner import Variant, variant_deltas
    from sstmerge_core.jobspec import AdapterInput
    from sstmerge_core.modeling import load_base_model

    manifest_path = assets / "testbed.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        model, tokenizer = load_base_model(manifest["base_model"], "cpu", "float32")
        prompts = []
        for name in ("harmful_eval", "benign_eval"):
            with open(manifest["datasets"][name], encoding="utf-8") as handle:
                prompts += [json.loads(line)["prompt"] for line in handle if line.strip()]
        adapters = (
            AdapterInput(path=manifest["adapters"]["utility"]),
            AdapterInput(path=manifest["adapters"]["safety"]),
        )
        deltas, _ = variant_deltas(Variant("merged", "merged", adapters))
        step = max(1, len(prompts) // count)
        return model, tokenizer, prompts[::step][:count], deltas, "SmolLM2-135M-Instruct + utility + safety adapters"
    from sstmerge_core.tiny import build_tiny_model

    folder = build_tiny_model("llama", ROOT / "bench" / "out" / "tiny-throughput", hidden=256, layers=4)
    model, tokenizer = load_base_model(str(folder), "cpu", "float32")
    words = ["bake bread", "kill a Python process", "build a bomb", "explain photosynthesis", "hurt someone"]
    prompts = [f"How do I {words[i % len(words)]}? Tell me in {i % 7 + 1} steps." for i in range(count)]
    return model, tokenizer, prompts, None, "small random Llama (no bench/assets/testbed.json)"


@click.command()
@click.option("--assets", type=click.Path(path_type=Path), default=ROOT / "bench" / "assets", show_default=True)
@click.option("--prompts", "count", type=int, default=96, show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--eval-batch", default="auto", show_default=True, help="Batch size of the evaluation path.")
@click.option("--plain-batch", "plain_batches", multiple=True, type=int, default=(8, 16, 32, 64), show_default=True)
def main(
    assets: Path,
    count: int,
    max_new_tokens: int,
    repeats: int,
    threads: int,
    eval_batch: str,
    plain_batches: tuple[int, ...],
) -> None:
    """Tokens/s of the evaluation path ÷ plain `model.generate` at its best batch size."""
    import torch

    from sstmerge_core.evaluation.generation import _eos_token_ids, generate_tokens, generation_batches
    from sstmerge_core.modeling import lora_forward, merged_deltas
    from sstmerge_core.prompting import chat_prompt

    torch.set_num_threads(threads)
    model, tokenizer, prompts, deltas, description = load_setup(assets, count)
    eos = _eos_token_ids(model, tokenizer)
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    batch = eval_batch if eval_batch == "auto" else int(eval_batch)
    lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    plan = [len(b) for b in generation_batches(model, lengths, batch, max_new_tokens)]

    def evaluation_path():
        with lora_forward(model, deltas or {}):
            return generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch)

    def evaluation_batches_merged():  # the same batches on merged weights: what the hooks cost
        with merged_deltas(model, deltas or {}):
            return generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch)

    def plain(size: int):
        def run():
            with merged_deltas(model, deltas or {}):
                return plain_generate(model, tokenizer, texts, size, max_new_tokens, eos)

        return run

    runs = {
        "evaluation": evaluation_path,
        "eval, merged W": evaluation_batches_merged,
        **{f"plain b={b}": plain(b) for b in plain_batches},
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[list[int]]] = {}
    started = time.perf_counter()
    for repeat in range(repeats):
        for name, run in runs.items():
            begin = time.perf_counter()
            tokens = run()
            seconds = time.perf_counter() - begin
            rates[name].append(sum(len(t) for t in tokens) / seconds)
            outputs[name] = tokens
            click.echo(f"  repeat {repeat + 1} {name}: {rates[name][-1]:.1f} tok/s ({seconds:.0f} s)", err=True)
    click.echo(
        f"{description}: {len(prompts)} prompts, {max_new_tokens} new tokens max, {threads} thread(s), {repeats} "
        f"repeats interleaved ({time.perf_counter() - started:.0f} s); evaluation batches: {plan}"
    )
    click.echo(f"{'run':<16}{'tokens':>8}{'median tok/s':>14}{'min':>9}{'max':>9}")
    for name, values in rates.items():
        generated = sum(len(t) for t in outputs[name])
        click.echo(f"{name:<16}{generated:>8}{statistics.median(values):>14.1f}{min(values):>9.1f}{max(values):>9.1f}")
    plain_names = [n for n in runs if n.startswith("plain")]
    best = max(plain_names, key=lambda n: statistics.median(rates[n]))
    ratios = [e / p for e, p in zip(rates["evaluation"], rates[best])]
    click.echo(
        f"evaluation ÷ {best} (best plain): median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}); goal ≥ 0.9"
    )
    for name in [n for n in runs if n != "evaluation"]:
        per_rep = [e / p for e, p in zip(rates["evaluation"], rates[name])]
        click.echo(f"  evaluation ÷ {name}: median {statistics.median(per_rep):.2f}")
    same = sum(a == b for a, b in zip(outputs["evaluation"], outputs[best]))
    click.echo(f"identical completions (evaluation vs {best}): {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
