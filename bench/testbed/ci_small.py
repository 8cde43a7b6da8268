"""A tiny version of the testbed datasets (a handful of rows each) for CI runs on SmolLM2.

Same file names, pools and disjoint splits as `prepare`, but with `rows` rows per dataset and no model
generation: benign responses are the committed short answers (borderline prompts get a fixed helpful
reply), so building it takes well under a second once the wheels are cached. Optionally trains two
small adapters (r=4, one short epoch) on top:

    python -m bench.testbed.ci_small --out /tmp/testbed-small [--rows 8] [--train]
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import assets, datasets

BORDERLINE_REPLY = "Sure, here is a short, safe answer."
SMALL_RECIPE = dict(r=4, lora_alpha=8, epochs=1, lr=1e-3, batch_size=4, max_length=96)


def small_answers(splits: datasets.Splits) -> dict[str, str]:
    """Responses for every prompt that `build_datasets` needs answered, without running a model."""
    answers = {row["prompt"]: row["response"] for row in splits.benign_train + splits.benign_fisher}
    answers.update({row["prompt"]: BORDERLINE_REPLY for row in splits.borderline_retain + splits.borderline_train})
    answers.update({prompt: "Here is a short answer." for prompt in splits.extra_benign})
    return answers


def build_small_datasets(out: Path, rows: int = 8, seed: int = 0) -> dict[str, Path]:
    """Write each testbed dataset with at most `rows` rows to OUT/data; returns {name: path}."""
    splits = datasets.make_splits(assets.harmful_prompts(), seed=seed)
    data = datasets.build_datasets(splits, small_answers(splits), seed=seed)
    paths = {}
    for name, all_rows in data.items():
        paths[name] = out / "data" / f"{name}.jsonl"
        datasets.write_jsonl(paths[name], all_rows[:rows])
    return paths


def train_small_adapters(out: Path, paths: dict[str, Path], seed: int = 0) -> dict[str, Path]:
    """Train a rank-4 utility and safety adapter on the small sets (seconds on CPU); returns {kind: folder}."""
    from sstmerge_core.data import load_examples
    from sstmerge_core.training import train_lora

    base = str(assets.smollm2_folder())
    return {
        kind: train_lora(
            base,
            load_examples(paths[f"{kind}_train"], require_response=True),
            out / "adapters" / kind,
            seed=seed,
            device="cpu",
            progress=False,
            **SMALL_RECIPE,
        )
        for kind in ("utility", "safety")
    }


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--rows", default=8, show_default=True, type=click.IntRange(min=1), help="Rows per dataset.")
@click.option("--seed", default=0, show_default=True, help="Seed of the splits (same as prepare's).")
@click.option("--train/--no-train", default=False, show_default=True, help="Also train two rank-4 adapters.")
def main(out: Path, rows: int, seed: int, train: bool) -> None:
    """Write the small testbed (and optionally its adapters) and print a manifest."""
    paths = build_small_datasets(out, rows, seed)
    manifest = {"base_model": str(assets.smollm2_folder()), "datasets": {k: str(v) for k, v in paths.items()}}
    if train:
        manifest["adapters"] = {k: str(v) for k, v in train_small_adapters(out, paths, seed).items()}
    (out / "testbed.json").write_text(json.dumps(manifest, indent=2))
    click.echo(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
