"""The recipe search on the SmolLM2 testbed, and the matched-safety table on its report split (bench/RESULTS.md).

    python -m bench.testbed.search --assets bench/assets --out bench/out/search [--budget 40] [--threads 2]
    python -m bench.testbed.search --out bench/out/search --render-only

1. `sstmerge_core.search.run_search` — the product's search — on the testbed's held-out pools (harmful, borderline,
   utility; cut into search and report splits by seed), with the repair's direction sets (borderline_direction,
   harmless_direction), both disjoint from every pool and from training (`datasets.check_disjoint`).
2. On the same report split, α sweeps of three families: the chosen recipe (its α varied), linear + repair and
   SST (soft, β = 1) + repair, the repair's layer and position chosen once by the repair's own selection on the
   α = 1 merge of that method, and its direction refitted at every α.
3. Each family and linear's front interpolated at safety 0.80 and 0.90, with paired bootstrap intervals of the
   differences; the repair's cost in general benign answers (ROUGE-L against the references); the repair's
   activation pass and the search's trial time as ratios to one evaluation pass, measured side by side.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import click

from sstmerge_core.logs import configure as configure_logging

ALPHAS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
FRONT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
TARGETS = (0.80, 0.90)
SELECTION_LAYER_STRIDE = 3  # the repair's selection for the families: every 3rd layer, every position
SST_FIXED = {"max_samples": 200, "max_length": 256, "batch_size": 8}  # the Fisher passes of every SST merge


def testbed_spec(assets: Path, *, max_new_tokens: int, report_fraction: float, cache_dir: Path, limit=None):
    from sstmerge_core.jobspec import EvaluationSpec, MergeSpec, RepairSpec

    manifest = json.loads((assets / "testbed.json").read_text())
    data = manifest["datasets"]
    return MergeSpec(
        base_model=manifest["base_model"],
        utility=[{"path": manifest["adapters"]["utility"]}],
        safety=[{"path": manifest["adapters"]["safety"]}],
        utility_data=data["utility_fisher"],
        safety_data=data["safety_fisher"],
        method="sst",
        params=dict(SST_FIXED),
        repair=RepairSpec(params={"max_samples": 64, "batch_size": 32}),
        harmless_data=data["harmless_direction"],
        borderline_data=data["borderline_direction"],
        evaluation=EvaluationSpec(
            harmful=data["harmful_pool"],
            benign=data["borderline_pool"],
            utility_eval=data["utility_pool"],
            max_new_tokens=max_new_tokens,
            report_fraction=report_fraction,
            limit=limit,
        ),
        device="cpu",
        dtype="float32",
        cache_dir=str(cache_dir),
    )


def family_recipes(chosen: dict | None, linear_repair, sst_repair, alphas=ALPHAS) -> dict[str, list]:
    """The three families of the table as recipes over ALPHAS."""
    from sstmerge_core.jobspec import RepairSpec
    from sstmerge_core.search.recipe import Recipe

    def sweep(method: str, params: dict, ablation) -> list:
        repair = RepairSpec(params=ablation.model_dump()) if ablation is not None else None
        return [Recipe(method=method, params={**params, "alphas": [a]}, repair=repair) for a in alphas]

    families = {}
    if linear_repair is not None:
        families["linear + repair"] = sweep("linear", {}, linear_repair)
    if sst_repair is not None:
        families["SST (soft β=1) + repair"] = sweep("sst", dict(SST_FIXED), sst_repair)
    if chosen is not None:
        recipe = Recipe.model_validate(chosen["recipe"])
        params = {k: v for k, v in recipe.params.items() if k != "alphas"}
        chosen_family = [
            Recipe(method=recipe.method, params={**params, "alphas": [a]}, repair=recipe.repair) for a in alphas
        ]
        families = {"chosen recipe (α swept)": chosen_family, **families}
    return families


def selected_repair(loaded, fisher, method: str):
    """The repair's own selection on the α = 1 merge of `method` (every SELECTION_LAYER_STRIDE-th candidate layer,
    the last prompt token: a cheaper grid than the default, for 2 CPU cores); returns the repair params with the
    chosen layer and position (None when no candidate qualified) and the selection report."""
    from sstmerge_core.repair.step import refusal_ablation
    from sstmerge_core.search.recipe import Recipe
    from sstmerge_core.search.runner import merged_recipe

    merged = merged_recipe(loaded, fisher, Recipe(method=method, params={"alphas": [1.0]}))
    params = loaded.repair.params.model_copy(update={"layer_stride": SELECTION_LAYER_STRIDE, "position": -1})
    outcome = refusal_ablation(loaded.model, loaded.tokenizer, loaded.repair.data, params, merged=merged.updates(1.0))
    chosen = outcome.report["chosen"]
    summary = {k: outcome.report[k] for k in ("baseline", "candidates", "chosen", "seconds")}
    if chosen is None:
        return None, summary
    return loaded.repair.params.model_copy(update={"layer": chosen["layer"], "position": -1}), summary


def main_table(out: Path, assets: Path, spec, settings, search_report: dict, threads: int | None, alphas) -> dict:
    """Steps 2 and 3 of the module docstring; returns the table dict."""
    from sstmerge_core.evaluation.metrics import UTILITY_METRICS
    from sstmerge_core.evaluation.outcomes import Outcomes
    from sstmerge_core.evaluation.runner import EvaluationData
    from sstmerge_core.search.matched import at_safety
    from sstmerge_core.search.runner import merged_recipe, reference_updates, search_spec
    from sstmerge_core.stages.evaluation import score_updates
    from sstmerge_core.stages.fisher import compute_fisher
    from sstmerge_core.stages.inputs import load_inputs

    loaded = load_inputs(search_spec(spec, settings))
    fisher = compute_fisher(loaded)
    data = loaded.evaluation.data
    splits = data.splits(settings.split_seed, settings.report_fraction)
    report_data, search_data = data.subset(splits, "report"), data.subset(splits, "search")

    timings = {}
    started = time.perf_counter()
    score_updates(loaded, {"before": reference_updates(loaded)["before"]}, data=search_data)
    timings["evaluation_pass_search_split_s"] = time.perf_counter() - started

    linear_repair, linear_selection = selected_repair(loaded, fisher, "linear")
    sst_repair, sst_selection = selected_repair(loaded, fisher, "sst")
    families = family_recipes(search_report["chosen"], linear_repair, sst_repair, alphas)

    if linear_repair is not None:
        from sstmerge_core.repair.step import refusal_ablation
        from sstmerge_core.search.recipe import Recipe

        merged = merged_recipe(loaded, fisher, Recipe(method="linear", params={"alphas": [1.0]}))
        started = time.perf_counter()
        refusal_ablation(loaded.model, loaded.tokenizer, loaded.repair.data, linear_repair, merged=merged.updates(1.0))
        timings["repair_step_s"] = time.perf_counter() - started

    outcomes: dict[str, list[tuple[float, Outcomes]]] = {}
    rates: dict[str, list[dict]] = {}
    for name, recipes in families.items():
        models = {f"{r.alpha:g}": merged_recipe(loaded, fisher, r).updates(r.alpha) for r in recipes}
        started = time.perf_counter()
        results = score_updates(loaded, models, data=report_data)
        timings.setdefault("evaluation_pass_report_split_s", (time.perf_counter() - started) / len(models))
        outcomes[name] = [(r.alpha, results[f"{r.alpha:g}"].outcomes) for r in recipes]
        rates[name] = [{"alpha": r.alpha, "label": r.label(), **_rates(results[f"{r.alpha:g}"])} for r in recipes]
        logging.getLogger(__name__).info("family %s on the report split: %s", name, json.dumps(rates[name]))

    linear = [(p["alpha"], Outcomes.from_dict(search_report["outcomes"][f"linear@{p['alpha']:g}"]))
              for p in search_report["linear_front"]]  # fmt: skip
    matched = {
        name: {f"{t:.2f}": at_safety(points, linear, t, seed=settings.seed) for t in TARGETS}
        for name, points in outcomes.items()
    }
    linear_at = {f"{t:.2f}": at_safety(linear, linear, t, seed=settings.seed) for t in TARGETS}

    general = general_benign_cost(loaded, fisher, families, assets)
    trial_median = search_report["trials"]["seconds_median"]
    one_pass = timings["evaluation_pass_search_split_s"]
    costs = {
        **{k: round(v, 2) for k, v in timings.items()},
        "repair_step_over_evaluation_pass": _ratio(timings.get("repair_step_s"), one_pass),
        "trial_over_evaluation_pass": _ratio(trial_median, one_pass),
        "trial_median_s": trial_median,
    }
    return {
        "report_split": _sizes(report_data),
        "search_split": _sizes(search_data),
        "selection": {"linear": linear_selection, "sst": sst_selection},
        "families": rates,
        "matched": matched,
        "linear_at": linear_at,
        "general_benign": general,
        "costs": costs,
        "threads": threads,
        "utility_metric": UTILITY_METRICS[loaded.evaluation.spec.utility_metric].name,
        "data": EvaluationData.summary(report_data),
    }  # fmt: skip


def _sizes(data) -> dict[str, int]:
    return {"harmful": len(data.harmful), "benign": len(data.benign), "utility": len(data.utility)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _rates(result) -> dict:
    return {"safety": result.safety.to_dict(), "over_refusal": result.over_refusal.to_dict(), "utility": result.utility}


def general_benign_cost(loaded, fisher, families: dict, assets: Path) -> dict:
    """ROUGE-L of answers to the held-out general benign prompts against their reference answers, and how many are
    refused, for each repaired family at α = 1 and the same merge without the repair."""
    import dataclasses

    from sstmerge_core.data import load_examples
    from sstmerge_core.evaluation.runner import EvaluationData
    from sstmerge_core.search.runner import merged_recipe
    from sstmerge_core.stages.evaluation import score_updates

    manifest = json.loads((assets / "testbed.json").read_text())
    rows = load_examples(manifest["datasets"]["general_benign_eval"], require_response=True)
    data = EvaluationData(harmful=rows[:1], benign=rows, utility=rows)
    spec = loaded.evaluation.spec.model_copy(update={"utility_metric": "rouge_l"})
    rouge = dataclasses.replace(loaded, evaluation=dataclasses.replace(loaded.evaluation, spec=spec))
    models = {}
    for name, recipes in families.items():
        recipe = next(r for r in recipes if r.alpha == 1.0)
        if recipe.repair is None:
            continue
        models[f"{name} @1"] = merged_recipe(loaded, fisher, recipe).updates(1.0)
        models[f"{name} @1 without repair"] = merged_recipe(
            loaded, fisher, recipe.model_copy(update={"repair": None})
        ).updates(1.0)
    results = score_updates(rouge, models, data=data)
    return {
        label: {"rouge_l": r.utility["value"], "refused": r.over_refusal.to_dict(), "n": len(rows)}
        for label, r in results.items()
    }


def _fmt(block: dict | None, key: str) -> str:
    if not block or not block.get("matched"):
        return "not both fronts span this safety (nothing extrapolated)"
    ci = block.get(f"delta_{key}_ci")
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    return f"{block[key]:.3f} ({block[f'delta_{key}']:+.3f}{interval})"


def render(search_report: dict, table: dict) -> str:
    """The markdown of bench/RESULTS.md's section."""
    chosen = search_report["chosen"]
    lines = [
        f"Search split: harmful {table['search_split']['harmful']}, borderline {table['search_split']['benign']}, "
        f"utility {table['search_split']['utility']}; report split: harmful {table['report_split']['harmful']}, "
        f"borderline {table['report_split']['benign']}, utility {table['report_split']['utility']}. "
        + search_report["splits"]["statement"],
        "",
        f"Trials: {search_report['trials']['count']}, within the tolerances on the search split: "
        f"{search_report['trials']['feasible']}.",
    ]
    if chosen is not None:
        m = chosen["matched_linear"]
        lines += [
            f"Chosen recipe: `{chosen['label']}`.",
            f"- search split: safety {chosen['search']['safety']['rate']:.3f}, over-refusal "
            f"{chosen['search']['over_refusal']['rate']:.3f}, utility {chosen['search']['utility']['value']:.3f}",
            f"- report split: safety {chosen['report']['safety']['rate']:.3f} "
            f"[{chosen['report']['safety']['ci_low']:.3f}, {chosen['report']['safety']['ci_high']:.3f}], over-refusal "
            f"{chosen['report']['over_refusal']['rate']:.3f} [{chosen['report']['over_refusal']['ci_low']:.3f}, "
            f"{chosen['report']['over_refusal']['ci_high']:.3f}], utility drop {chosen['report']['utility_drop']:+.3f}",
        ]
        if m["matched"]:
            ci = m["delta_over_refusal_ci"]
            lines.append(
                f"- against linear at the same safety (report split): over-refusal {m['delta_over_refusal']:+.3f} "
                f"[{ci[0]:+.3f}, {ci[1]:+.3f}] (paired bootstrap), utility {m['delta_utility']:+.3f}"
            )
        else:
            lines.append(f"- outside linear's safety range {m['reference_safety_range']}: no matched comparison")
    else:
        lines.append(f"Nothing recommended: {search_report['reason']}")
    return "\n".join([*lines, "", *matched_table(table["linear_at"], table["matched"])])


def matched_table(linear_at: dict, matched: dict) -> list[str]:
    """The markdown rows of the matched-safety table: linear's interpolated front, then each family, per target."""
    lines = ["| at safety | family | over-refusal (Δ vs linear [95% paired CI]) | utility (Δ vs linear) |",
             "|---|---|---|---|"]  # fmt: skip
    for target in (f"{t:.2f}" for t in TARGETS):
        lin = linear_at[target]
        value = f"{lin['over_refusal']:.3f} | {lin['utility']:.3f}" if lin.get("matched") else "outside the front |"
        lines.append(f"| {target} | linear (interpolated front) | {value} |")
        for name, by_target in matched.items():
            block = by_target[target]
            lines.append(f"| {target} | {name} | {_fmt(block, 'over_refusal')} | {_fmt(block, 'utility')} |")
    return lines


@click.command()
@click.option("--assets", default="bench/assets", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default="bench/out/search", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--budget", default=40, show_default=True, help="Search trials.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-over-refusal-increase", default=0.15, show_default=True)
@click.option("--max-utility-drop", default=0.02, show_default=True)
@click.option("--report-fraction", default=0.62, show_default=True)
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--threads", default=None, type=int, help="torch CPU threads (1 on a busy machine).")
@click.option("--limit", default=None, type=int, help="At most this many prompts per pool (a quick run).")
@click.option(
    "--alpha",
    "alphas",
    multiple=True,
    type=float,
    default=ALPHAS,
    show_default=True,
    help="α of the families' sweeps on the report split.",
)
@click.option(
    "--front-alpha",
    "front_alphas",
    multiple=True,
    type=float,
    default=FRONT_ALPHAS,
    show_default=True,
    help="α of linear's front on the report split.",
)
@click.option(
    "--report-points", default=6, show_default=True, help="Pareto-optimal trials confirmed on the report split."
)
@click.option("--skip-search", is_flag=True, help="Reuse OUT/search_report.json; run only the table.")
@click.option("--render-only", is_flag=True, help="Only re-render OUT/table.md from OUT/*.json.")
def main(assets, out, budget, seed, max_over_refusal_increase, max_utility_drop, report_fraction, max_new_tokens,
         threads, limit, alphas, front_alphas, report_points, skip_search, render_only) -> None:  # fmt: skip
    """Run the recipe search and the matched-safety table on the SmolLM2 testbed."""
    configure_logging("INFO")
    search_dir = out / "search"
    if render_only:
        report = json.loads((search_dir / "search_report.json").read_text())
        table = json.loads((out / "table.json").read_text())
        (out / "table.md").write_text(render(report, table) + "\n")
        click.echo(render(report, table))
        return
    import torch

    from sstmerge_core.search.runner import run_search
    from sstmerge_core.search.space import SearchSettings
    from sstmerge_core.stages.inputs import ModelCache

    if threads:
        torch.set_num_threads(threads)
    spec = testbed_spec(assets, max_new_tokens=max_new_tokens, report_fraction=report_fraction,
                        cache_dir=out / "cache", limit=limit)  # fmt: skip
    settings = SearchSettings(
        budget=budget, seed=seed, max_over_refusal_increase=max_over_refusal_increase,
        max_utility_drop=max_utility_drop, report_fraction=report_fraction,
        front_alphas=list(front_alphas), report_points=report_points,
    )  # fmt: skip
    started = time.perf_counter()
    if not skip_search:
        run_search(spec, settings, search_dir, model_cache=ModelCache())
    search_seconds = time.perf_counter() - started
    report = json.loads((search_dir / "search_report.json").read_text())
    table = main_table(out, assets, spec, settings, report, threads, alphas)
    table["search_seconds"] = round(search_seconds, 1)
    trials = json.loads((search_dir / "trials.json").read_text())
    table["trial_seconds"] = {"median": statistics.median(t["seconds"] for t in trials)}
    (out / "table.json").write_text(json.dumps(table, indent=2))
    (out / "table.md").write_text(render(report, table) + "\n")
    click.echo(render(report, table))


if __name__ == "__main__":
    main()
