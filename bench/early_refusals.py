"""Evaluation of a harmful set with refusals decided early ÷ the same evaluation with full generations, side by side.

The evaluation path (`evaluation.generation.generate`, the keyword judge) runs twice per repetition, interleaved:
once generating every row to its end (`max_new_tokens` or end of sequence), once stopping each row as soon as the
judge's verdict is settled (`KeywordJudge.settled_refusal`). It prints the wall-time ratio (median over
repetitions), the generated tokens of each, and whether the refusal outcomes are identical row by row (they must be).

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
    runs = {"full": None, "early": judge.settled_refusal}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    completions: dict[str, list[str]] = {}
    for repeat in range(repeats):
        for name, decided in runs.items():
            begin = time.perf_counter()
            with lora_forward(model, deltas):
                completions[name] = generate(
                    model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch, decided=decided
                )
            seconds[name].append(time.perf_counter() - begin)
            click.echo(f"  repeat {repeat + 1} {name}: {seconds[name][-1]:.1f} s", err=True)
    verdicts = {name: judge.judge(prompts, texts) for name, texts in completions.items()}
    tokens = {
        name: sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in c)
        for name, c in completions.items()
    }
    ratios = [e / f for e, f in zip(seconds["early"], seconds["full"])]
    click.echo(
        f"{description}: {len(prompts)} prompts, {max_new_tokens} new tokens max, batch {batch_size}, "
        f"{threads} thread(s), {repeats} repeats interleaved"
    )
    for name in runs:
        click.echo(f"  {name:<6} median {statistics.median(seconds[name]):.1f} s, {tokens[name]} completion tokens")
    click.echo(
        f"early ÷ full wall time: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, "
        f"max {max(ratios):.2f}); refused {sum(verdicts['full'])} of {len(prompts)}"
    )
    same = sum(a == b for a, b in zip(verdicts["early"], verdicts["full"]))
    click.echo(f"identical outcomes: {same} of {len(prompts)}")
    if same != len(prompts):
        raise SystemExit("outcomes differ: the early verdict is wrong")


if __name__ == "__main__":
    main()
