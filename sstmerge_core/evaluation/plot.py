"""The metrics.json picture: safety vs utility (left) and safety vs over-refusal (right).

- One line per method through its α sweep (its front, in α order), points with their 95% intervals as light
  error bars; base, before and the safety adapter as distinct markers.
- When a linear merge was evaluated, a dotted segment joins each point of the other methods to linear's front
  (a tick in linear's colour) at the same safety (interpolated between linear's neighbouring α, up to its
  safest α, never extrapolated): the matched-safety comparison of docs/method.md.
- Labels (α for sweep points, names for the references) are placed only where they overlap no other label or
  marker; the recommended model is always labelled (★), and the runner-up (☆) when it fits.

Uses matplotlib's object API with the Agg canvas (no pyplot state, safe in worker threads).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from ..contracts.metrics import Metrics, ModelEntry, Recommended
from ..search.matched import front_curve, interpolate

RATE_LIMITS = (-0.03, 1.03)
DPI = 110
REFERENCE_STYLE: dict[str, dict[str, Any]] = {
    "base": {"marker": "s", "color": "0.45", "label": "base"},
    "before": {"marker": "D", "color": "black", "label": "before (base + utility)"},
    "safety": {"marker": "*", "color": "crimson", "label": "safety adapter alone", "ms": 13},
}
LABEL_OFFSETS = ((6, 5), (6, -13), (-6, 5), (-6, -13), (0, 10), (0, -17), (10, -4), (-10, -4))
"""Candidate label positions around a point (points), tried in order."""


@dataclass(frozen=True)
class Point:
    model: ModelEntry
    x: float
    y: float
    colour: str


def _y(model: ModelEntry, key: str) -> float:
    """The model's utility value or over-refusal rate (the panel's y)."""
    return model.utility.value if key == "utility" else model.over_refusal.rate


def _y_interval(model: ModelEntry, key: str) -> tuple[float | None, float | None]:
    block = model.utility if key == "utility" else model.over_refusal
    return block.ci_low, block.ci_high


def _error(point: float, low: float | None, high: float | None) -> list[list[float]] | None:
    """matplotlib's asymmetric error bar [[below], [above]] from an interval, None without one."""
    if low is None or high is None:
        return None
    return [[max(point - low, 0.0)], [max(high - point, 0.0)]]


def _methods(models: list[ModelEntry]) -> dict[str, list[ModelEntry]]:
    """Sweep points by method (merged and baseline kinds), each list in α order."""
    by_method: dict[str, list[ModelEntry]] = {}
    for model in models:
        if model.kind in ("merged", "baseline"):
            by_method.setdefault(model.method or model.kind, []).append(model)
    for points in by_method.values():
        points.sort(key=lambda m: (m.alpha is None, m.alpha or 0.0))
    return by_method


def _linear_front(by_method: dict[str, list[ModelEntry]], key: str):
    linear = [(m.alpha, m) for m in by_method.get("linear", []) if m.alpha is not None]
    if len(linear) < 2:
        return None
    return front_curve([a for a, _ in linear], [m.safety.rate for _, m in linear], [_y(m, key) for _, m in linear])


def _draw_panel(ax, models: list[ModelEntry], key: str, colours: dict[str, str]) -> list[tuple[Point, str]]:
    """Lines, points, intervals and matched-safety segments; returns the labels to place (point, text)."""
    by_method = _methods(models)
    for method, points in by_method.items():
        xs, ys = [m.safety.rate for m in points], [_y(m, key) for m in points]
        ax.plot(xs, ys, "-", color=colours[method], lw=2.2 if method == "linear" else 1.6, alpha=0.9, zorder=2)
        for m, x, y in zip(points, xs, ys):
            ax.errorbar(
                x,
                y,
                xerr=_error(x, m.safety.ci_low, m.safety.ci_high),
                yerr=_error(y, *_y_interval(m, key)),
                fmt="o",
                ms=5,
                color=colours[method],
                ecolor=to_rgba(colours[method], 0.3),
                elinewidth=0.8,
                capsize=0,
                zorder=3,
            )
    front = _linear_front(by_method, key)
    if front is not None:
        for method, points in by_method.items():
            if method == "linear":
                continue
            for m in points:
                matched = interpolate(front, m.safety.rate)
                if matched is not None:
                    x = m.safety.rate
                    ax.plot([x, x], [matched[0], _y(m, key)], ":", color="0.25", lw=1.2, zorder=2.5)
                    ax.plot(x, matched[0], "_", color=colours["linear"], ms=9, mew=1.6, zorder=2.5)
    for model in models:
        style = REFERENCE_STYLE.get(model.kind)
        if style is None:
            continue
        x, y = model.safety.rate, _y(model, key)
        ax.errorbar(
            x,
            y,
            xerr=_error(x, model.safety.ci_low, model.safety.ci_high),
            yerr=_error(y, *_y_interval(model, key)),
            fmt=style["marker"],
            ms=style.get("ms", 8),
            color=style["color"],
            ecolor=to_rgba(style["color"], 0.3),
            elinewidth=0.8,
            zorder=4,
        )
    labels: list[tuple[Point, str]] = []
    for model in models:
        style = REFERENCE_STYLE.get(model.kind)
        colour = style["color"] if style else colours[model.method or model.kind]
        point = Point(model, model.safety.rate, _y(model, key), colour)
        if style is not None:
            labels.append((point, model.kind))
        elif model.alpha is not None:
            labels.append((point, f"α={model.alpha:g}"))
        else:
            labels.append((point, model.label))
    ax.set_xlim(*RATE_LIMITS)
    ax.set_xlabel("safety (refusal rate on harmful prompts) →")
    ax.grid(alpha=0.25)
    return labels


def _place_labels(ax, labels: list[tuple[Point, str]], recommended: Recommended) -> None:
    """Annotate the recommended model first (always), then the runner-up and the others, each at the first
    offset where it stays inside the axes and overlaps no placed label and no other marker; else not at all."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)

    def marker_box(point: Point) -> Bbox:
        x, y = ax.transData.transform((point.x, point.y))
        return Bbox.from_bounds(x - 5, y - 5, 10, 10)

    chosen = recommended.label
    runner_up = recommended.runner_up.label if recommended.runner_up is not None else None
    items = []
    for point, text in labels:
        if point.model.label == chosen:
            items.append((0, point, f"★ {chosen} (recommended)"))
        elif point.model.label == runner_up:
            items.append((1, point, f"☆ {runner_up} (runner-up)"))
        else:
            items.append((2, point, text))
    items.sort(key=lambda item: item[0])
    for rank, point, _ in items:
        if rank < 2:  # a ring around the recommended model (solid) and the runner-up (dashed)
            ax.plot(point.x, point.y, "o", ms=15, mfc="none", mec="black", mew=1.4, ls="", zorder=5)
            if rank == 1:
                ax.lines[-1].set_markeredgewidth(0.8)
    markers = [(id(point), marker_box(point)) for _, point, _ in items]
    placed: list[Bbox] = []
    for rank, point, text in items:
        obstacles = placed + [box for owner, box in markers if owner != id(point)]
        for dx, dy in LABEL_OFFSETS:
            annotation = ax.annotate(
                text,
                (point.x, point.y),
                textcoords="offset points",
                xytext=(dx, dy),
                ha="left" if dx >= 0 else "right",
                fontsize=8 if rank < 2 else 7,
                fontweight="bold" if rank == 0 else "normal",
                color="black" if rank < 2 else point.colour,
                zorder=6,
            )
            box = annotation.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            last = (dx, dy) == LABEL_OFFSETS[-1]
            if (inside and not any(box.overlaps(other) for other in obstacles)) or (rank == 0 and last):
                placed.append(box)
                break
            annotation.remove()


def build_figure(metrics: Metrics) -> Figure:
    """The two-panel figure of a metrics.json (module docstring)."""
    models = metrics.models
    methods = sorted(_methods(models))
    palette = [f"C{i}" for i in range(10)]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    recommended = metrics.recommended

    figure = Figure(figsize=(13, 5.6), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.06, right=0.99, top=0.86, bottom=0.2, wspace=0.16)
    left, right = figure.subplots(1, 2)
    left_labels = _draw_panel(left, models, "utility", colours)
    higher_is_better = metrics.utility_higher_is_better
    left.set_ylabel(f"utility ({metrics.utility_metric}{'' if higher_is_better else ', lower is better'})")
    if higher_is_better:
        left.set_ylim(*RATE_LIMITS)  # exact_match, contains and rouge_l all lie in [0, 1]
    else:
        left.invert_yaxis()
    left.set_title("safety vs utility (up and right is better)", fontsize=10)
    right_labels = _draw_panel(right, models, "over_refusal", colours)
    right.set_ylim(*RATE_LIMITS)
    right.set_ylabel("over-refusal (refusal rate on benign prompts)")
    right.set_title("safety vs over-refusal (down and right is better)", fontsize=10)
    figure.canvas.draw()  # fix the transforms before measuring labels
    _place_labels(left, left_labels, recommended)
    _place_labels(right, right_labels, recommended)

    handles = [left.plot([], [], "o-", color=colours[m], label=f"{m} (α sweep)")[0] for m in methods]
    for kind, style in REFERENCE_STYLE.items():
        if any(m.kind == kind for m in models):
            handles.append(
                left.plot([], [], style["marker"], color=style["color"], ms=style.get("ms", 8), label=style["label"])[0]
            )
    if recommended.label:
        handles.append(
            left.plot([], [], "o", ms=11, mfc="none", mec="black", label="★ recommended, ☆ runner-up (ringed)")[0]
        )
    if "linear" in colours and len(methods) > 1:
        handles.append(
            left.plot(
                [],
                [],
                ":",
                color="0.25",
                marker="_",
                mec=colours["linear"],
                ms=9,
                mew=1.6,
                label="gap to linear's front (—) at the same safety",
            )[0]
        )
    figure.legend(handles=handles, loc="lower center", ncols=min(len(handles), 5), fontsize=8, frameon=False)
    if recommended.label:
        headline = f"recommended ★ {recommended.label} (chosen on the search split)"
    else:
        headline = "recommended: none — " + recommended.reason[:110]
    figure.suptitle(
        f"{headline}\njudge: {metrics.judge}; whole evaluation sets; bars: 95% Wilson intervals", fontsize=9
    )
    return figure


def render_png(metrics: Metrics) -> bytes:
    """The two-panel PNG of a metrics.json, as bytes."""
    buffer = io.BytesIO()
    build_figure(metrics).savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
