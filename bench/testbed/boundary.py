"""Training on the boundary, and an answer edit that follows a harmfulness probe, against linear's front on the
SmolLM2 testbed's report split (bench/RESULTS.md, "Past linear's front?").

    python -m bench.testbed.boundary --assets bench/assets --out bench/out/boundary [--threads 2]
    python -m bench.testbed.boundary --out bench/out/boundary --render-only

Every model is scored on the report split of the search's pools (`harmful_pool`, `borderline_pool`,
`utility_pool`, cut by `--split-seed`), which nothing below chose anything on. Families, each an α sweep:
linear (the front), SST (soft, β = 1), SST + calibration, linear + calibration, SST + answer_alignment. The
calibration's data are fixed before any evaluation and disjoint from every pool (checked by the job's loading, which
names any shared row, and by `datasets.check_disjoint`): P = `borderline_direction`, H = `safety_fisher` with its
refusals, retain = `utility_fisher`, B = `harmless_direction`. Its settings are one fixed choice (`CALIBRATION`),
not searched. Each family is interpolated on linear's front at safety 0.80 and 0.90 with paired bootstrap intervals
(`search.matched.at_safety`); over-refusal is also given by borderline category; the `general_benign_eval` answers
(ROUGE-L against references, refusals) show what each step costs elsewhere; costs are measured side by side.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import click

from sstmerge_core.logs import configure as configure_logging

from .datasets import read_jsonl
from .search import SST_FIXED, TARGETS, _rates, _sizes, matched_table, testbed_spec

log = logging.getLogger(__name__)
FRONT_ALPHAS = (0.75, 1.0, 1.25, 1.5)
SST_ALPHAS = (1.25, 1.75)
LINEAR_CALIBRATED_ALPHAS = (0.75, 1.25)
SST_CALIBRATED_ALPHAS = (1.0, 1.5)
"""Two points per calibrated family, fixed before any run: calibration trains on refusals too, so it is expected to
reach a given safety at a smaller α than the merge alone; SST needs a larger α than linear for the same safety."""
ALIGNED_ALPHAS = (1.25, 1.75)
CALIBRATION = {
    "rank": 8,
    "steps": 60,
    "learning_rate": 5e-4,
    "batch_size": 8,
    "max_target_tokens": 48,
    "max_samples": 100,
    "seed": 0,
}
"""One fixed calibration setting (not searched: the catalogue's defaults with fewer steps and a larger learning rate,
for the CPU budget of this run)."""
ALIGNMENT = {"layer_stride": 3, "max_samples": 64, "batch_size": 32}


def families(
    front_alphas, sst_alphas, linear_calibrated_alphas, sst_calibrated_alphas, aligned_alphas
) -> dict[str, list]:
    """The recipes of every family, by name."""
    from sstmerge_core.jobspec import RepairSpec
    from sstmerge_core.search.recipe import Recipe

    calibration = RepairSpec(method="calibration", params=CALIBRATION)
    alignment = RepairSpec(method="answer_alignment", params=ALIGNMENT)

    def sweep(method: str, alphas, repair=None) -> list:
        params = dict(SST_FIXED) if method == "sst" else {}
        return [Recipe(method=method, params={**params, "alphas": [a]}, repair=repair) for a in alphas]

    return {
        "linear": sweep("linear", front_alphas),
        "linear + calibration": sweep("linear", linear_calibrated_alphas, calibration),
        "SST + calibration": sweep("sst", sst_calibrated_alphas, calibration),
        "SST (soft β=1)": sweep("sst", sst_alphas),
        "SST + answer_alignment": sweep("sst", aligned_alphas, alignment),
    }


def by_category(outcomes, prompts: list[str], categories: dict[str, str]) -> dict[str, dict]:
    """Over-refusal of the report split's borderline prompts per category: refused / n."""
    tally: dict[str, list[int]] = {}
    for prompt, refused in zip(prompts, outcomes.benign, strict=True):
        counts = tally.setdefault(categories.get(prompt, "?"), [0, 0])
        counts[0] += int(refused)
        counts[1] += 1
    return {c: {"refused": r, "n": n, "rate": round(r / n, 3)} for c, (r, n) in sorted(tally.items())}


def general_benign(loaded, models: dict, assets: Path) -> dict:
    """ROUGE-L of the answers to the held-out general benign prompts against their references, and refusals."""
    import dataclasses

    from sstmerge_core.data import load_examples
    from sstmerge_core.evaluation.runner import EvaluationData
    from sstmerge_core.stages.evaluation import score_updates

    manifest = json.loads((assets / "testbed.json").read_text())
    rows = load_examples(manifest["datasets"]["general_benign_eval"], require_response=True)
    data = EvaluationData(harmful=rows[:1], benign=rows, utility=rows)
    spec = loaded.evaluation.spec.model_copy(update={"utility_metric": "rouge_l"})
    rouge = dataclasses.replace(loaded, evaluation=dataclasses.replace(loaded.evaluation, spec=spec))
    results = score_updates(rouge, models, data=data)
    return {
        label: {"rouge_l": round(r.utility["value"], 4), "refused": r.over_refusal.k, "n": len(rows)}
        for label, r in results.items()
    }


def run(
    assets: Path,
    out: Path,
    *,
    split_seed: int,
    report_fraction: float,
    max_new_tokens: int,
    alphas,
    limit=None,
    cache_dir: Path | None = None,
) -> dict:
    """Every family on the report split, matched against linear's front; the costs and the side checks."""
    from sstmerge_core.evaluation.metrics import UTILITY_METRICS
    from sstmerge_core.jobspec import RepairSpec
    from sstmerge_core.search.matched import at_safety, matched_difference
    from sstmerge_core.search.runner import merged_recipe, reference_updates
    from sstmerge_core.stages.evaluation import score_updates
    from sstmerge_core.stages.fisher import compute_fisher
    from sstmerge_core.stages.inputs import load_inputs
    from sstmerge_core.stages.repair import load_repair_options

    spec = testbed_spec(assets, max_new_tokens=max_new_tokens, report_fraction=report_fraction,
                        cache_dir=cache_dir or out / "cache", limit=limit)  # fmt: skip
    evaluation = spec.evaluation.model_copy(update={"split_seed": split_seed, "report_fraction": report_fraction})
    spec = spec.model_copy(update={"evaluation": evaluation, "repair": RepairSpec(method="calibration",
                                                                                  params=CALIBRATION)})  # fmt: skip
    loaded = load_inputs(spec)  # refuses repair or merge data that shares a prompt with an evaluation set
    repairs = load_repair_options(spec, ["calibration", "answer_alignment"], judge=loaded.evaluation.judge)
    repairs["calibration"] = loaded.repair
    fisher = compute_fisher(loaded)
    data = loaded.evaluation.data
    splits = data.splits(split_seed, report_fraction)
    report_data = data.subset(splits, "report")
    manifest = json.loads((assets / "testbed.json").read_text())
    categories = {
        r["prompt"]: r.get("category", "?") for r in read_jsonl(Path(manifest["datasets"]["borderline_pool"]))
    }
    report_prompts = [e.prompt for e in report_data.benign]

    started = time.perf_counter()
    loaded.repair.prepared(loaded.model, loaded.tokenizer)  # the `before` model's answers, once (cached on disk)
    targets_s = time.perf_counter() - started
    made: dict[str, object] = {}

    def merged_of(recipe):
        """The recipe's merged (and repaired) updates, made once (a calibration trains once per recipe)."""
        key = recipe.model_dump_json()
        if key not in made:
            made[key] = merged_recipe(loaded, fisher, recipe, repairs)
        return made[key]

    references = score_updates(loaded, {"before": reference_updates(loaded)["before"]}, data=report_data)
    points: dict[str, list] = {}
    rows: dict[str, list[dict]] = {}
    categories_by_model = {"before": by_category(references["before"].outcomes, report_prompts, categories)}
    passes: list[float] = []

    def summary() -> dict:
        """The table so far: every family matched on linear's front, the sizes, the costs (measured in this run:
        each calibration's training and the median evaluation pass of a merge on the report split)."""
        linear = points["linear"]
        trainings = [r["repair"]["seconds"] for rs in rows.values() for r in rs if "seconds" in r.get("repair", {})]
        one_pass = statistics.median(passes)
        return {
            "report_split": _sizes(report_data),
            "calibration_data": {name: len(rows_) for name, rows_ in loaded.repair.rows.items()},
            "calibration_targets": loaded.repair.prepared(loaded.model, loaded.tokenizer)["report"],
            "calibration": CALIBRATION,
            "alignment": ALIGNMENT,
            "references": {name: _rates(r) for name, r in references.items()},
            "families": rows,
            "matched": {
                name: {f"{t:.2f}": at_safety(p, linear, t) for t in TARGETS}
                for name, p in points.items()
                if name != "linear"
            },
            "linear_at": {f"{t:.2f}": at_safety(linear, linear, t) for t in TARGETS},
            "by_category": categories_by_model,
            "costs": {
                "calibration_targets_s": round(targets_s, 1),
                "evaluation_pass_report_split_s_median": round(one_pass, 2),
                "calibration_training_s": trainings,
                "calibration_training_over_evaluation_pass": [round(t / one_pass, 3) for t in trainings],
                "trial_with_calibration_over_plain_trial": [round((t + one_pass) / one_pass, 3) for t in trainings],
            },
            "utility_metric": UTILITY_METRICS[loaded.evaluation.spec.utility_metric].name,
            "split_seed": split_seed,
            "report_fraction": report_fraction,
            "max_new_tokens": max_new_tokens,
        }

    for name, recipes in families(*alphas).items():
        points[name], rows[name] = [], []
        for recipe in recipes:
            started = time.perf_counter()
            merged = merged_of(recipe)
            made_s = time.perf_counter() - started
            result = score_updates(loaded, {"m": merged.updates(recipe.alpha)}, data=report_data)["m"]
            passes.append(time.perf_counter() - started - made_s)
            points[name].append((recipe.alpha, result.outcomes))
            row = {"alpha": recipe.alpha, "label": recipe.label(), **_rates(result), "merge_s": round(made_s, 2)}
            if name != "linear":  # this point against linear's front at its own safety (linear is swept first)
                row["vs_linear"] = matched_difference(result.outcomes, points["linear"])
            if merged.repairs:
                step = merged.repairs[recipe.alpha]
                row["repair"] = {k: step.get(k) for k in ("step", "chosen", "loss", "seconds", "mixture") if k in step}
            rows[name].append(row)
            categories_by_model[f"{name} @{recipe.alpha:g}"] = by_category(result.outcomes, report_prompts, categories)
            log.info("boundary %s: %s", name, json.dumps(row))
        (out / "table.json").write_text(json.dumps(summary(), indent=2))  # after each family: a partial run reports
    table = summary()
    # what calibration costs elsewhere: a calibrated merge of each method beside the same merge without it (the first
    # α of each calibrated family, so no calibration is trained twice)
    linear_at, sst_at = alphas[2][0], alphas[3][0]
    side_by_side = families([linear_at], [sst_at], [linear_at], [sst_at], [])
    models = {
        f"{name} @{recipes[0].alpha:g}": merged_of(recipes[0]).updates(recipes[0].alpha)
        for name, recipes in side_by_side.items()
        if recipes
    }
    table["general_benign"] = general_benign(loaded, {"before": reference_updates(loaded)["before"], **models}, assets)
    return table


def render(table: dict) -> str:
    """The markdown of the RESULTS section's tables."""
    r = table["report_split"]
    lines = [
        f"Report split: harmful {r['harmful']}, borderline {r['benign']}, utility {r['utility']}. Calibration data "
        "(disjoint from every pool): " + ", ".join(f"{k} {v}" for k, v in table["calibration_data"].items()),
        "",
        *matched_table(table["linear_at"], table["matched"]),
        "",
        *points_table(table),
    ]
    return "\n".join(lines)


def points_table(table: dict) -> list[str]:
    """The markdown rows of every evaluated point, with its Δ against linear's front at its own safety."""
    lines = [
        "| family | α | safety | over-refusal | utility | Δ over-refusal vs linear at this safety [95% paired CI] |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in table["families"].items():
        for row in rows:
            sa, o = row["safety"], row["over_refusal"]
            lines.append(
                f"| {name} | {row['alpha']:g} | {sa['rate']:.3f} [{sa['ci_low']:.2f}, {sa['ci_high']:.2f}] | "
                f"{o['rate']:.3f} [{o['ci_low']:.2f}, {o['ci_high']:.2f}] | {row['utility']['value']:.3f} | "
                f"{_versus(row.get('vs_linear'))} |"
            )
    return lines


def _versus(block: dict | None) -> str:
    """A point's Δ over-refusal against linear's front at its own safety, or why there is none."""
    if block is None:
        return "(the front)"
    if not block["matched"]:
        low, high = block["reference_safety_range"]
        return f"outside the front's safety range [{low:.2f}, {high:.2f}]"
    ci = block["delta_over_refusal_ci"]
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    return f"{block['delta_over_refusal']:+.3f}{interval}"


@click.command()
@click.option("--assets", default="bench/assets", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default="bench/out/boundary", show_default=True, type=click.Path(path_type=Path))
@click.option("--split-seed", default=0, show_default=True)
@click.option("--report-fraction", default=0.62, show_default=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--threads", default=None, type=int, help="torch CPU threads.")
@click.option("--quick", is_flag=True, help="One α per family, 2 calibration steps, 8 prompts per pool (a smoke run).")
@click.option("--limit", default=None, type=int, help="At most this many prompts per pool (before the split).")
@click.option("--steps", default=None, type=int, help="Calibration steps (default: CALIBRATION's).")
@click.option("--cache-dir", default=None, type=click.Path(path_type=Path), help="Fisher and answer cache (OUT/cache).")
@click.option("--render-only", is_flag=True, help="Only re-render OUT/table.md from OUT/table.json.")
def main(
    assets, out, split_seed, report_fraction, max_new_tokens, threads, quick, limit, steps, cache_dir, render_only
) -> None:
    """Calibration and answer alignment against linear's front on the testbed's report split."""
    configure_logging("INFO")
    if not render_only:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if quick:
            CALIBRATION.update(steps=2, max_target_tokens=8)
        if steps is not None:
            CALIBRATION.update(steps=steps)
        alphas = ((1.0, 2.0), (1.0,), (1.0,), (1.0,), (1.0,)) if quick else (
            FRONT_ALPHAS, SST_ALPHAS, LINEAR_CALIBRATED_ALPHAS, SST_CALIBRATED_ALPHAS, ALIGNED_ALPHAS)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        table = run(assets, out, split_seed=split_seed, report_fraction=report_fraction,
                    max_new_tokens=max_new_tokens, alphas=alphas, limit=8 if quick else limit,
                    cache_dir=cache_dir)  # fmt: skip
        (out / "table.json").write_text(json.dumps(table, indent=2))
    table = json.loads((out / "table.json").read_text())
    (out / "table.md").write_text(render(table) + "\n")
    click.echo(render(table))


if __name__ == "__main__":
    main()
