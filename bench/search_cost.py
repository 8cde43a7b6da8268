"""What a recipe search costs with and without pruning, side by side in one process, on the same inputs.

    .venv/bin/python -m bench.search_cost [--assets bench/assets] [--budget 30] [--threads 2] [--out DIR]

Runs `run_search` twice with the same settings and seed — `prune` off (every trial evaluated to the end, as before
pruning existed) and on (the default) — after timing one evaluation pass of `before` on the search split. It prints,
for each: wall time, trials completed/pruned, the median trial ÷ one evaluation pass (pruned trials included), and the
chosen recipe with its search-split safety and report-split numbers. Both runs use the α bracketing of the current
code, so the comparison isolates pruning; the bracketing's effect is the chosen recipe against the warm start's best.

With `bench/assets/testbed.json` it runs the SmolLM2 testbed's pools (as `bench.testbed.search`); otherwise the
self-contained example of `sstmerge demo`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def example_spec(cache_dir: Path):
    from sstmerge_core.example import demo_spec, prepare_example

    assets = prepare_example(ROOT / "bench" / "out" / "example")
    return demo_spec(assets, cache_dir).model_copy(update={"compare_with": []})


@click.command()
@click.option("--assets", type=click.Path(path_type=Path), default=ROOT / "bench" / "assets", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "bench" / "out" / "search_cost")
@click.option("--budget", type=int, default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="testbed only")
def main(assets: Path, out: Path, budget: int, seed: int, threads: int, max_new_tokens: int) -> None:
    """Search wall time and trial cost, pruning off ÷ on, with the chosen recipes."""
    import torch

    from sstmerge_core.search.runner import reference_updates, run_search, search_spec
    from sstmerge_core.search.space import SearchSettings
    from sstmerge_core.stages.evaluation import score_updates
    from sstmerge_core.stages.inputs import ModelCache, load_inputs

    torch.set_num_threads(threads)
    if (assets / "testbed.json").is_file():
        from bench.testbed.search import testbed_spec

        spec = testbed_spec(assets, max_new_tokens=max_new_tokens, report_fraction=0.5, cache_dir=out / "cache")
        where = "SmolLM2 testbed"
    else:
        spec, where = example_spec(out / "cache"), "the example (sstmerge demo's world)"
    cache = ModelCache()
    base = SearchSettings(budget=budget, seed=seed, repair="search" if spec.repair is not None else "off")
    loaded = load_inputs(search_spec(spec, base), model_cache=cache)
    assert loaded.evaluation is not None
    splits = loaded.evaluation.data.splits(base.split_seed, base.report_fraction)
    search_data = loaded.evaluation.data.subset(splits, "search")
    started = time.perf_counter()
    score_updates(loaded, {"before": reference_updates(loaded)["before"]}, data=search_data)
    one_pass = time.perf_counter() - started

    rows = {}
    for name, prune in (("prune off", False), ("prune on", True)):
        settings = base.model_copy(update={"prune": prune})
        started = time.perf_counter()
        outcome = run_search(spec, settings, out / name.replace(" ", "_"), model_cache=cache)
        seconds = time.perf_counter() - started
        trials = json.loads((outcome.out_dir / "trials.json").read_text())
        chosen = outcome.report["chosen"]
        rows[name] = {
            "wall_s": round(seconds, 1),
            "completed": sum(t["state"] == "complete" for t in trials),
            "pruned": sum(t["state"] == "pruned" for t in trials),
            "trial_over_pass_median": round(statistics.median(t["seconds"] for t in trials) / one_pass, 3),
            "chosen": chosen["label"] if chosen else None,
            "chosen_search_safety": chosen["search"]["safety"]["rate"] if chosen else None,
            "chosen_report": {k: chosen["report"][k] for k in ("safety", "over_refusal", "utility_drop",
                                                               "over_refusal_increase")} if chosen else None,
        }  # fmt: skip
        click.echo(f"  {name}: {seconds:.0f} s", err=True)
    click.echo(f"{where}: budget {budget}, seed {seed}, {threads} thread(s); one evaluation pass on the search split "
               f"(before): {one_pass:.1f} s")  # fmt: skip
    for name, row in rows.items():
        click.echo(f"{name}: {json.dumps(row, ensure_ascii=False)}")
    off, on = rows["prune off"], rows["prune on"]
    click.echo(
        f"wall time on ÷ off: {on['wall_s'] / off['wall_s']:.2f}; same chosen recipe: {on['chosen'] == off['chosen']}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_cost.json").write_text(json.dumps({"one_pass_s": one_pass, **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
