"""Evaluation of a harmful set with refusals decided early ÷ the same evaluation with full generations, side by side.

Three runs per repetition, interleaved, on the same batches (longest first, `--batch-size`):
- `generate`: the evaluation path before ended rows left the batch: `model.generate` (greedy) per batch, every row to
  its end (`max_new_tokens` or end of sequence), a batch running until its last row ends;
- `full`: `evaluation.generation.generate` without early verdicts (rows that reach end of sequence leave the batch);
- `early`: the same with each row stopped as soon as the keyword judge's verdict is settled
  (`KeywordJudge.settled_refusal`), and the row leaving the batch.
It prints each run's median wall time, the ratios to `generate` (median over repetitions), the completion tokens,
and whether the refusal outcomes are identical row by row to `generate`'s (they must be).

    .venv/bin/python -m bench.early_refusals [--assets bench/assets] [--max-new-tokens 64] [--repeats 3] [--threads 2]

With `bench/assets/testbed.json` (`python -m bench.testbed.prepare`) it runs SmolLM2-135M-Instruct with the utility
and safety adapters applied at weight 1 on the testbed's held-out harmful prompts; otherwise the safety adapter of
the self-contained example (`sstmerge demo`'s world) on the example's harmful prompts.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def load_setup(assets: Path):
    """(model, tokenizer, harmful prompts, adapter deltas, description)."""
    from sstmerge_core.data import load_examples
    from sstmerge_core.evaluation.runner import Variant, variant_deltas
    from sstmerge_core.example import prepare_example
    from sstmerge_core.jobspec import AdapterInput
    from sstmerge_core.modeling import load_base_model

    manifest_path = assets / "testbed.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        base, harmful = manifest["base_model"], manifest["datasets"]["harmful_eval"]
        adapters = [manifest["adapters"]["utility"], manifest["adapters"]["safety"]]
        description = "SmolLM2-135M-Instruct + utility + safety adapters, testbed harmful_eval"
    else:
        example = prepare_example(ROOT / "bench" / "out" / "example")
        base, harmful, adapters = str(example.base), example.harmful_eval, [example.safety_adapter]
        description = "the example's tiny Llama + safety adapter, example harmful_eval"
    model, tokenizer = load_base_model(base, "cpu", "float32")
    deltas, _ = variant_deltas(Variant("v", "merged", tuple(AdapterInput(path=str(a)) for a in adapters)))
    return model, tokenizer, [e.prompt for e in load_examples(harmful)], deltas, description


@click.command()
@click.option("--assets", type=click.Path(path_type=Path), default=ROOT / "bench" / "assets", show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--batch-size", default="32", show_default=True, help="Evaluation batch size, or auto.")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
def main(assets: Path, max_new_tokens: int, batch_size: str, repeats: int, threads: int) -> None:
    """Wall time of the harmful set with early-decided refusals ÷ with full generations; outcomes compared."""
    import torch

    from sstmerge_core.evaluation.generation import generate
    from sstmerge_core.evaluation.judges import KeywordJudge
    from sstmerge_core.modeling import lora_forward

    torch.set_num_threads(threads)
    model, tokenizer, prompts, deltas, description = load_setup(assets)
    judge = KeywordJudge()
    batch = batch_size if batch_size == "auto" else int(batch_size)
    runs = {
        "generate": lambda: generate_reference(model, tokenizer, prompts, max_new_tokens, batch),
        "full": lambda: generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch),
        "early": lambda: generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch, decided=judge.settled_refusal
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    completions: dict[str, list[str]] = {}
    for repeat in range(repeats):
        for name, run in runs.items():
            begin = time.perf_counter()
            with lora_forward(model, deltas):
                completions[name] = run()
            seconds[name].append(time.perf_counter() - begin)
            click.echo(f"  repeat {repeat + 1} {name}: {seconds[name][-1]:.1f} s", err=True)
    verdicts = {name: judge.judge(prompts, texts) for name, texts in completions.items()}
    tokens = {
        name: sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in c)
        for name, c in completions.items()
    }
    click.echo(
        f"{description}: {len(prompts)} prompts, {max_new_tokens} new tokens max, batch {batch_size}, "
        f"{threads} thread(s), {repeats} repeats interleaved; refused {sum(verdicts['generate'])} of {len(prompts)}"
    )
    for name in runs:
        ratios = [s / g for s, g in zip(seconds[name], seconds["generate"])]
        click.echo(
            f"  {name:<8} median {statistics.median(seconds[name]):6.1f} s, ÷ generate {statistics.median(ratios):.2f} "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}), {tokens[name]} completion tokens"
        )
    differ = [name for name in runs if verdicts[name] != verdicts["generate"]]
    full_texts = sum(a == b for a, b in zip(completions["full"], completions["generate"]))
    click.echo(
        f"identical outcomes: {'all runs' if not differ else 'NOT ' + ', '.join(differ)}; "
        f"full completions equal to generate's: {full_texts} of {len(prompts)}"
    )
    if differ:
        raise SystemExit("outcomes differ from model.generate's")


def generate_reference(model, tokenizer, prompts: list[str], max_new_tokens: int, batch) -> list[str]:
    """Greedy completions by `model.generate` on the evaluation's batches, each row cut after its first end of
    sequence: the evaluation path as it was before ended rows left the running batch."""
    import torch
    from transformers import GenerationConfig

    from sstmerge_core.evaluation.generation import _eos_token_ids, generation_batches
    from sstmerge_core.prompting import chat_prompt

    eos = _eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    ids = tokenizer([chat_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for batch_rows in generation_batches(model, [len(x) for x in ids], batch, max_new_tokens):
            inputs = tokenizer.pad(
                {"input_ids": [ids[i] for i in batch_rows]}, padding=True, padding_side="left", return_tensors="pt"
            )
            width = inputs["input_ids"].shape[1]
            for i, row in zip(batch_rows, model.generate(**inputs, generation_config=config)[:, width:].tolist()):
                rows[i] = row[: next((t + 1 for t, token in enumerate(row) if token in eos), len(row))]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


if __name__ == "__main__":
    main()
