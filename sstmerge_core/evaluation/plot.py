"""The metrics.json picture: safety vs utility (left) and safety vs over-refusal (right), one point per
evaluated model with its 95% intervals as error bars, Pareto-optimal points ringed.

Uses matplotlib's object API with the Agg canvas (no pyplot state, safe in worker threads).
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RATE_LIMITS = (-0.03, 1.03)


def _group(model: dict) -> str:
    """Colour group: the method for merged variants and baselines, else the kind (base, before, safety)."""
    return model["method"] if model["kind"] in ("merged", "baseline") and model["method"] else model["kind"]


def _error(point: float, low: float | None, high: float | None) -> list[list[float]] | None:
    """matplotlib's asymmetric error bar [[below], [above]] from an interval, None without one."""
    if low is None or high is None:
        return None
    return [[max(point - low, 0.0)], [max(high - point, 0.0)]]


def _draw(ax, models: list[dict], y_key: str, colours: dict[str, str]) -> None:
    for model in models:
        safety = model["safety"]
        y_block = model[y_key]
        y = y_block["value"] if y_key == "utility" else y_block["rate"]
        ax.errorbar(
            safety["rate"],
            y,
            xerr=_error(safety["rate"], safety["ci_low"], safety["ci_high"]),
            yerr=_error(y, y_block["ci_low"], y_block["ci_high"]),
            fmt="o",
            color=colours[_group(model)],
            ecolor=colours[_group(model)],
            alpha=0.85,
            capsize=2,
            ms=5,
        )
        if model["pareto"]:
            ax.plot(safety["rate"], y, "o", ms=12, mfc="none", mec="black", mew=1.2)
        ax.annotate(model["label"], (safety["rate"], y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlim(*RATE_LIMITS)
    ax.set_xlabel("safety (refusal rate on harmful prompts)")
    ax.grid(alpha=0.3)


def render_png(metrics: dict) -> bytes:
    """The two-panel PNG of a metrics.json dict, as bytes."""
    models = metrics["models"]
    groups = sorted({_group(m) for m in models})
    palette = [f"C{i}" for i in range(10)]
    colours = {g: palette[i % len(palette)] for i, g in enumerate(groups)}

    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    _draw(left, models, "utility", colours)
    higher_is_better = metrics["utility_higher_is_better"]
    left.set_ylabel(f"utility ({metrics['utility_metric']}{'' if higher_is_better else ', lower is better'})")
    if higher_is_better:
        left.set_ylim(*RATE_LIMITS)  # exact_match, contains and rouge_l all lie in [0, 1]
    else:
        left.invert_yaxis()
    left.set_title("safety vs utility (up and right is better)")
    _draw(right, models, "over_refusal", colours)
    right.set_ylim(*RATE_LIMITS)
    right.set_ylabel("over-refusal (refusal rate on benign prompts)")
    right.set_title("safety vs over-refusal (down and right is better)")
    handles = [left.plot([], [], "o", color=colours[g], label=g)[0] for g in groups]
    handles.append(left.plot([], [], "o", ms=12, mfc="none", mec="black", label="Pareto-optimal")[0])
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8)
    figure.suptitle(f"judge: {metrics['judge']}; bars: 95% intervals", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
