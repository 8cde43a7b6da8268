"""The testbed table: SST-Merge (several selection rules) against every baseline over an α sweep,
evaluated on held-out prompts, compared at matched safety (docs/method.md, sstmerge_core/evaluation/README.md).

    python -m bench.testbed.table --assets bench/assets --out bench/out/table

Needs `python -m bench.testbed.prepare` first (model, datasets, trained adapters). SST variants share
cached Fisher passes (one per estimator and data set); the base model is loaded once and every merged
adapter is evaluated on it (base, before = base + utility, safety = base + safety, and each method × α).
Writes OUT/metrics.json, OUT/plot.png and OUT/table.md, and prints the table; `--render-only` re-renders
OUT/table.md from OUT/metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sstmerge_core.contracts.metrics import Metrics, ModelEntry, Rate
from sstmerge_core.jobspec import AdapterInput, EvaluationSpec, MergeSpec

from .datasets import read_jsonl, write_jsonl

SST_CONFIGS = {
    "sst soft β=1": {"selection": "soft", "beta": 1.0},
    "sst soft β=10": {"selection": "soft", "beta": 10.0},
    "sst topk k=16": {"selection": "topk", "k": 16},
    "sst topk k=64": {"selection": "topk", "k": 64},
    "sst input k_in=8": {"selection": "input", "k_in": 8},
    "sst soft β=1 empirical-U": {"selection": "soft", "beta": 1.0, "utility_fisher": "empirical"},
    "sst soft β=1 retain-U": {"selection": "soft", "beta": 1.0},
    "sst soft β=10 retain-U": {"selection": "soft", "beta": 10.0},
}
RETAIN_KINDS = ("benign", "borderline")
"""Configurations named "retain-U" estimate F_U only on the rows of `utility_fisher` of these kinds (benign and
borderline-benign prompts with the base model's own answers): the behaviour a merge should keep, without
the task rows."""
BASELINES = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def fmt_rate(block: Rate) -> str:
    return f"{block.rate:.2f} [{block.ci_low:.2f}, {block.ci_high:.2f}]"


def fmt(value) -> str:
    return "—" if value is None else f"{value:+.3f}" if isinstance(value, float) else str(value)


def selection(params: dict) -> str:
    """The SST selection rule and its knob (β, k or k_in) of a model's `params`, with the utility-Fisher estimator
    when not sampled."""
    rule = params.get("selection")
    if rule is None:
        return ""
    knob = {
        "soft": f"β={params.get('beta', 1.0):g}",
        "topk": f"k={params.get('k')}",
        "input": f"k_in={params.get('k_in')}",
    }
    estimator = params.get("utility_fisher", "sampled")
    return f"{rule} {knob[rule]}" + ("" if estimator == "sampled" else f", {estimator} F_U")


def markdown_table(metrics: Metrics) -> str:
    """One row per evaluated model: the columns of the testbed table."""
    header = (
        "| model | method | selection | α | safety [95% CI] | over-refusal [95% CI] | utility | safety_gain | "
        "utility_drop | safety_tax | refusal_tax | Pareto |"
    )
    lines = [header, "|---" * 12 + "|"]
    for m in metrics.models:
        d = m.derived
        gain, drop, safety_tax, refusal_tax = (
            (d.safety_gain, d.utility_drop, d.safety_tax, d.refusal_tax) if d else (None, None, None, None)
        )
        alpha = "" if m.alpha is None else f"{m.alpha:g}"
        lines.append(
            f"| {m.label} | {m.method or m.kind} | {selection(m.params)} | {alpha} | {fmt_rate(m.safety)} | "
            f"{fmt_rate(m.over_refusal)} | {m.utility.value:.3f} | {fmt(gain)} | "
            f"{fmt(drop)} | {fmt(safety_tax)} | {fmt(refusal_tax)} | "
            f"{'yes' if m.pareto else ''} |"
        )
    return "\n".join(lines)


def linear_front(refs: list[ModelEntry]) -> tuple[list[float], list[float], list[float]]:
    """The reference sweep as (safety, over-refusal, utility) lists sorted by safety, taken in order of α up
    to its safest point: past it a larger α breaks the model (safety falls again along with everything else),
    which is not a trade-off anyone would choose. A safety reached at several α keeps the mean of the others."""
    by_alpha = sorted(refs, key=lambda m: m.alpha or 0.0)
    peak = max(range(len(by_alpha)), key=lambda i: (by_alpha[i].safety.rate, -i))
    by_safety: dict[float, list[ModelEntry]] = {}
    for m in by_alpha[: peak + 1]:
        by_safety.setdefault(m.safety.rate, []).append(m)
    safety = sorted(by_safety)
    over = [sum(m.over_refusal.rate for m in by_safety[s]) / len(by_safety[s]) for s in safety]
    utility = [sum(m.utility.value for m in by_safety[s]) / len(by_safety[s]) for s in safety]
    return safety, over, utility


def matched_safety(evaluated: list[ModelEntry], reference: str = "linear") -> str:
    """Each other merge against the reference method's front at the same safety: over-refusal and utility
    of the reference interpolated linearly in safety between its two neighbouring α points, and the
    differences (negative Δ over-refusal and positive Δ utility favour the merge). Points whose safety lies
    outside the reference's range are marked so rather than extrapolated."""
    import numpy as np

    models = [m for m in evaluated if m.kind in ("merged", "baseline")]
    refs = [m for m in models if m.method == reference]
    if not refs:
        return f"(no {reference} points to compare with)"
    safety, over, utility = linear_front(refs)
    lines = [
        f"| model | α | safety | over-refusal | utility | {reference} over-refusal at that safety | "
        f"{reference} utility at that safety | Δ over-refusal | Δ utility |",
        "|---" * 9 + "|",
    ]
    for m in models:
        if m.method == reference:
            continue
        s, o, u = m.safety.rate, m.over_refusal.rate, m.utility.value
        head = f"| {m.label} | {m.alpha:g} | {s:.3f} | {o:.3f} | {u:.3f} |"
        if not safety[0] <= s <= safety[-1]:
            lines.append(head + f" outside {reference}'s safety range [{safety[0]:.3f}, {safety[-1]:.3f}] | | | |")
            continue
        o_ref, u_ref = float(np.interp(s, safety, over)), float(np.interp(s, safety, utility))
        lines.append(head + f" {o_ref:.3f} | {u_ref:.3f} | {o - o_ref:+.3f} | {u - u_ref:+.3f} |")
    return "\n".join(lines)


@click.command()
@click.option(
    "--assets",
    "assets_dir",
    default="bench/assets",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--out", default="bench/out/table", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--alpha", "alphas", multiple=True, type=float, default=(0.5, 1.0, 1.5, 2.0), show_default=True)
@click.option(
    "--front-alpha",
    "front_alphas",
    multiple=True,
    type=float,
    help="Extra α values for linear only, to trace the reference front the others are compared with.",
)
@click.option("--max-samples", default=200, show_default=True, help="Examples per Fisher data set.")
@click.option("--limit", default=None, type=int, help="Prompts per evaluation set (default: all).")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--render-only", is_flag=True, help="Only re-render OUT/table.md from an existing OUT/metrics.json.")
@click.option("--configs", default=",".join(SST_CONFIGS), show_default=True, help="SST configurations (comma list).")
@click.option("--baselines", default=",".join(BASELINES), show_default=True, help="Baseline methods (comma list).")
def main(
    assets_dir: Path,
    out: Path,
    alphas: tuple[float, ...],
    front_alphas: tuple[float, ...],
    max_samples: int,
    limit: int | None,
    max_new_tokens: int,
    configs: str,
    baselines: str,
    render_only: bool,
) -> None:
    """Merge with every SST configuration and baseline, evaluate all points, print the table."""
    from sstmerge_core import logs
    from sstmerge_core.evaluation.runner import Variant, evaluate_variants, write_outputs
    from sstmerge_core.modeling import ModelRef
    from sstmerge_core.pipeline import ModelCache, run_merge

    if render_only:
        render(Metrics.model_validate_json((out / "metrics.json").read_bytes()), out)
        return
    logs.configure("INFO")
    manifest = json.loads((assets_dir / "testbed.json").read_text())
    data, adapters, base = manifest["datasets"], manifest["adapters"], manifest["base_model"]
    evaluation = EvaluationSpec(
        harmful=data["harmful_eval"],
        benign=data["benign_eval"],
        utility_eval=data["utility_eval"],
        utility_metric="exact_match",
        max_new_tokens=max_new_tokens,
        limit=limit,
        batch_size=16,
    )
    cache = ModelCache()
    common = dict(
        base_model=base,
        utility=[AdapterInput(path=adapters["utility"])],
        safety=[AdapterInput(path=adapters["safety"])],
        utility_data=data["utility_fisher"],
        safety_data=data["safety_fisher"],
        device="cpu",
        dtype="float32",
        cache_dir=str(out / "cache"),
    )
    variants = [
        Variant("base", "base"),
        Variant("before", "before", (AdapterInput(path=adapters["utility"]),)),
        Variant("safety", "safety", (AdapterInput(path=adapters["safety"]),)),
    ]
    retain = out / "retain_fisher.jsonl"
    for name in [c.strip() for c in configs.split(",") if c.strip()]:
        params = {**SST_CONFIGS[name], "alphas": list(alphas), "max_samples": max_samples, "max_length": 192}
        spec = MergeSpec(**common, method="sst", params=params)
        if name.endswith("retain-U"):
            rows = read_jsonl(Path(data["utility_fisher"]))
            write_jsonl(retain, [r for r in rows if r.get("kind") in RETAIN_KINDS])
            spec = spec.model_copy(update={"utility_data": str(retain)})
        outcome = run_merge(spec, out / name.replace(" ", "_"), model_cache=cache)
        diagnostics = outcome.summary.diagnostics.model_dump(mode="json")
        click.echo(f"{name}: fisher {outcome.summary.timings_s}, diagnostics {diagnostics}")
        variants += [
            Variant(f"{name} @{a:g}", "merged", str(d), method="sst", alpha=a, params=params)
            for a, d in outcome.adapter_dirs.items()
        ]
    for name in [b.strip() for b in baselines.split(",") if b.strip()]:
        sweep = sorted({*alphas, *front_alphas}) if name == "linear" else list(alphas)
        outcome = run_merge(MergeSpec(**common, method=name, params={"alphas": sweep}), out / name, model_cache=cache)
        variants += [
            Variant(f"{name} @{a:g}", "baseline", str(d), method=name, alpha=a) for a, d in outcome.adapter_dirs.items()
        ]

    model, tokenizer = cache.get(ModelRef.parse(base), "cpu", "float32")
    with click.progressbar(length=1000, label="evaluating") as bar:
        state = {"done": 0}

        def progress(_stage: str, fraction: float) -> None:
            step = int(fraction * 1000) - state["done"]
            if step > 0:
                bar.update(step)
                state["done"] += step

        metrics = evaluate_variants(model, tokenizer, variants, evaluation, progress, main_method="sst")
    write_outputs(metrics, out / "metrics.json", out / "plot.png")
    render(metrics, out)


def render(metrics: Metrics, out: Path) -> None:
    """Write OUT/table.md (the table and the matched-safety comparison) and print it."""
    comparison = matched_safety(metrics.models)
    table = f"{markdown_table(metrics)}\n\nAt matched safety (linear's front, interpolated):\n\n{comparison}"
    (out / "table.md").write_text(table + "\n")
    click.echo(table)
    click.echo(f"recommended: {metrics.recommended.model_dump(mode='json')}")


if __name__ == "__main__":
    main()
