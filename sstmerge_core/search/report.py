"""What a recipe search writes: search_report.json (the choice, the Pareto set and linear's front on the report
split, matched-safety comparisons), trials.json (every trial on the search split) and plot.png."""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..contracts.search_report import SearchReport
from ..evaluation.runner import ModelResult
from ..files import write_atomic
from .trials import PrunedTrial, Trial

if TYPE_CHECKING:
    from ..evaluation.splits import Splits
    from .runner import SearchContext

SCHEMA_VERSION = 2
"""2: trials pruned and their total seconds, the warning and the price list (1: the layout before them)."""
PRICE_RULE = (
    "for each safety target, the trial with search-split safety ≥ the target and utility_drop ≤ {utility:g} of "
    "lowest search-split over-refusal (over-refusal tolerance and cap not applied), confirmed on the report split"
)
REPORT_FILE = "search_report.json"
TRIALS_FILE = "trials.json"
PLOT_FILE = "plot.png"
STATEMENT = (
    "Trials were scored on the search split only. Every number under a `report` key (references, chosen, "
    "pareto, price_list, linear_front, matched comparisons) comes from the report split, which no trial saw and "
    "which was evaluated only after the choice was made."
)


def rates(result: ModelResult) -> dict:
    """Safety, over-refusal and utility of one model with n and 95% intervals."""
    return {"safety": result.safety.to_dict(), "over_refusal": result.over_refusal.to_dict(), "utility": result.utility}


def against(result: ModelResult, before: ModelResult, higher_is_better: bool) -> dict:
    """Rates plus utility_drop and over_refusal_increase relative to `before` on the same prompts."""
    mine, theirs = result.scores(higher_is_better), before.scores(higher_is_better)
    return {
        **rates(result),
        "utility_drop": theirs.utility - mine.utility,
        "over_refusal_increase": mine.over_refusal - theirs.over_refusal,
    }


def trial_entry(ctx: SearchContext, trial: Trial, confirmed: Mapping[str, Any]) -> dict:
    label = f"trial-{trial.number}"
    result = confirmed["results"][label]
    return {
        "trial": trial.number,
        "label": trial.recipe.label(),
        "recipe": trial.recipe.model_dump(),
        "search": {**rates(trial.result), "utility_drop": trial.utility_drop,
                   "over_refusal_increase": trial.over_refusal_increase},
        "report": against(result, confirmed["results"]["before"], ctx.higher_is_better),
        "matched_linear": confirmed["matched"][label],
        "repair": dict(trial.repair) if trial.repair is not None else None,
    }  # fmt: skip


def search_report(
    ctx: SearchContext,
    *,
    splits: Splits,
    trials: Sequence[Trial | PrunedTrial],
    chosen: Trial | None,
    pareto: Sequence[Trial],
    confirmed: Mapping[str, Any],
    objective: str,
    prices: Sequence[tuple[float, Trial | None]] = (),
) -> dict:
    """The search_report.json dict (layout in docs/search.md); `prices`: the price list's pick per safety target
    (`runner.priced_trials`, picked on the search split), each confirmed on the report split."""
    results: Mapping[str, ModelResult] = confirmed["results"]
    split_info = {k: v for k, v in splits.to_dict().items() if k != "report_indices"}
    seconds = [t.seconds for t in trials]
    feasible = [t for t in trials if t.feasible]
    pruned = [t for t in trials if isinstance(t, PrunedTrial)]
    report = {
        "schema_version": SCHEMA_VERSION,
        "objective": objective,
        "settings": ctx.settings.model_dump(),
        "splits": {**split_info, "statement": STATEMENT},
        "references": {
            "search": {"before": rates(ctx.before), "safety": rates(ctx.safety)},
            "report": {"before": rates(results["before"]), "safety": rates(results["safety"])},
        },
        "trials": {
            "count": len(trials),
            "feasible": len(feasible),
            "pruned": len(pruned),
            "seconds_median": statistics.median(seconds) if seconds else None,
            "seconds_total": round(sum(seconds), 2),
            "file": TRIALS_FILE,
        },
        "chosen": trial_entry(ctx, chosen, confirmed) if chosen is not None else None,
        "warning": None,
        "price_list": {
            "rule": PRICE_RULE.format(utility=ctx.settings.max_utility_drop),
            "chosen_on": "search",
            "reported_on": "report",
            "targets": [
                {"target": target, **(trial_entry(ctx, t, confirmed) if t is not None else {"label": None})}
                for target, t in prices
            ],
        },
        "pareto": [trial_entry(ctx, t, confirmed) for t in pareto],
        "linear_front": [
            {"alpha": alpha, "report": rates(results[f"linear@{alpha:g}"])} for alpha in confirmed["linear_alphas"]
        ],
        "outcomes": {label: result.outcomes.to_dict() for label, result in results.items()},
    }
    if chosen is None:
        report["reason"] = (
            f"none of the {len(trials)} trials met the constraints on the search split; nothing is recommended "
            "(loosen the tolerances, widen the space or raise the budget)"
        )
    return report


def write_search_files(root: Path, *, report: Mapping[str, Any], trials: Sequence[Trial | PrunedTrial]) -> None:
    """search_report.json (checked against its contract, `contracts.search_report.SearchReport`), trials.json and
    plot.png under `root`, each written atomically."""

    def dump(value: Any) -> bytes:
        return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False).encode() + b"\n"

    write_atomic(root / REPORT_FILE, dump(SearchReport.model_validate(report).model_dump(mode="json")))
    write_atomic(root / TRIALS_FILE, dump([t.to_dict() for t in trials]))
    write_atomic(root / PLOT_FILE, render_plot(report, trials))


def render_plot(report: Mapping[str, Any], trials: Sequence[Trial | PrunedTrial]) -> bytes:
    """Over-refusal against safety: every trial on the search split (left), and on the report split linear's front,
    the Pareto set and the chosen recipe (right), with 95% intervals on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    feasible = [t for t in trials if isinstance(t, Trial) and t.feasible]
    others = [t for t in trials if isinstance(t, Trial) and not t.feasible]
    pruned = [t.stop.bounds for t in trials if isinstance(t, PrunedTrial)]
    left.scatter([t.scores.safety for t in others], [t.scores.over_refusal for t in others], facecolors="none",
                 edgecolors="grey", label="trial (violates a constraint)")  # fmt: skip
    left.scatter([b["safety"][1] for b in pruned], [b["over_refusal"][0] for b in pruned], marker="x",
                 color="grey", label="pruned trial (its best case when stopped)")  # fmt: skip
    left.scatter([t.scores.safety for t in feasible], [t.scores.over_refusal for t in feasible], color="tab:blue",
                 label="trial (feasible)")  # fmt: skip
    chosen = report.get("chosen")
    if chosen is not None:
        left.scatter([chosen["search"]["safety"]["rate"]], [chosen["search"]["over_refusal"]["rate"]], marker="*",
                     s=220, color="tab:red", zorder=5, label="chosen")  # fmt: skip
    before = report["references"]["search"]["before"]
    left.axhline(before["over_refusal"]["rate"] + report["settings"]["max_over_refusal_increase"], color="tab:red",
                 lw=0.8, ls=":", label="over-refusal bound")  # fmt: skip
    left.set(title="search split: every trial", xlabel="safety (refusal rate, harmful)",
             ylabel="over-refusal (refusal rate, benign)")  # fmt: skip

    def point(ax, block: dict, **style) -> None:
        s, o = block["safety"], block["over_refusal"]
        ax.errorbar(s["rate"], o["rate"], xerr=[[s["rate"] - s["ci_low"]], [s["ci_high"] - s["rate"]]],
                    yerr=[[o["rate"] - o["ci_low"]], [o["ci_high"] - o["rate"]]], capsize=2, **style)  # fmt: skip

    front = sorted(report["linear_front"], key=lambda p: p["alpha"])
    right.plot([p["report"]["safety"]["rate"] for p in front], [p["report"]["over_refusal"]["rate"] for p in front],
               "-o", color="tab:grey", ms=3, label="linear (α sweep)")  # fmt: skip
    for entry in report["pareto"]:
        point(right, entry["report"], fmt="s", color="tab:blue", ms=5)
    if chosen is not None:
        point(right, chosen["report"], fmt="*", color="tab:red", ms=14, label="chosen")
    for name, marker in (("before", "^"), ("safety", "v")):
        point(right, report["references"]["report"][name], fmt=marker, color="black", ms=6, label=name)
    right.set(title="report split: confirmed", xlabel="safety (refusal rate, harmful)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
