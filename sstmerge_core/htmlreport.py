"""`report.html`: one self-contained page per job — the recommendation with its rule, the price of safety, every
evaluated model with its intervals, the plot, the search's trials and matched-safety comparison (a search job),
sample answers, and the inputs with their sha256.

Rendered from the Jinja2 template `templates/report.html.j2` (package data) with autoescaping on, so that every
string from the job (prompts, answers, adapter and dataset names) is HTML-escaped. The page holds no script and
fetches nothing: CSS is inline, the plot is a `data:` URI, and its Content-Security-Policy forbids everything else.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from .contracts.metrics import Metrics, ModelEntry, PriceList, Rate, Recommended, Utility
from .contracts.summary import SearchPriceList
from .evaluation.pricing import notice_lines

REPORT_HTML = "report.html"
TEMPLATE = "report.html.j2"
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@functools.cache
def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    environment = Environment(
        loader=PackageLoader("sstmerge_core", "templates"), autoescape=True, undefined=StrictUndefined
    )
    return environment.get_template(TEMPLATE)


def render_page(view: Mapping[str, Any]) -> str:
    """The page of a view (`merge_view`, `search_view`); every string in it is escaped by the template."""
    defaults: dict[str, Any] = {
        "subtitle": "",
        "recommendation": None,
        "prices": None,
        "models": None,
        "plot": None,
        "search": None,
        "samples": None,
        "inputs": [],
        "footer": "Written by sstmerge. Self-contained: no script, nothing fetched.",
    }
    return _template().render(**{**defaults, **view})


def _trial_cells(t: Mapping) -> list[str]:
    """A trials.json row as the trials table shows it (a pruned trial: where it stopped and why)."""
    if t.get("state") == "pruned":
        stop = t["pruned"]
        where = f"pruned after {stop['seen']}/{stop['of']} {stop['at']} prompts: {stop['reason']}"
        return [str(t["number"]), t["label"], "—", "—", "—", "—", "—", where]
    return [
        str(t["number"]),
        t["label"],
        _number(t["safety"]),
        _number(t["over_refusal"]),
        _number(t["utility"]),
        f"{t['utility_drop']:+.3f}",
        f"{t['over_refusal_increase']:+.3f}",
        "yes" if t["feasible"] else "",
    ]


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def interval(block: Rate | Utility | Mapping | None) -> str:
    """`0.850 [0.62, 0.95]` of a rate or utility block, `0.850` without an interval, `—` without a block. A mapping
    is a block of search_report.json, read with the same models."""
    if isinstance(block, Mapping):
        block = Utility.model_validate(block) if "value" in block else Rate.model_validate(block)
    if block is None:
        return "—"
    text = _number(block.rate if isinstance(block, Rate) else block.value)
    if block.ci_low is not None and block.ci_high is not None:
        text += f" [{_number(block.ci_low, 2)}, {_number(block.ci_high, 2)}]"
    return text


def plot_image(png: bytes | None, alt: str) -> dict | None:
    return None if not png else {"src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"), "alt": alt}


def _tolerances(recommended: Recommended) -> str:
    return ", ".join(f"{k} ≤ {v:g}" if v is not None else f"{k}: unbounded" for k, v in recommended.tolerances)


def _split_rows(recommended: Recommended) -> list[dict]:
    rows = []
    for name, entry, css in (("★ ", recommended, "chosen"), ("☆ ", recommended.runner_up, "runner")):
        if entry is None or entry.label is None:
            continue
        for split in ("search", "report"):
            numbers = getattr(entry, split)
            rows.append(
                {
                    "label": name + entry.label,
                    "split": split,
                    "safety": interval(numbers.safety if numbers else None),
                    "over_refusal": interval(numbers.over_refusal if numbers else None),
                    "utility": interval(numbers.utility if numbers else None),
                    "css": css,
                }
            )
    return rows


def recommendation_view(recommended: Recommended) -> dict:
    warning = recommended.warning
    return {
        "label": recommended.label,
        "reason": recommended.reason,
        "rule": recommended.rule,
        "tolerances": _tolerances(recommended),
        "warnings": [warning] if warning else [],
        "notes": [line for line in notice_lines(recommended) if line != warning],
        "splits": _split_rows(recommended),
    }


def prices_view(block: PriceList | SearchPriceList) -> dict:
    """The price-list table: the pick of each target with its numbers on the split it is reported on."""
    split = block.reported_on
    rows = []
    for row in block.targets:
        numbers = getattr(row, split, None)
        rows.append(
            {
                "target": f"{row.target:.2f}",
                "label": row.label,
                "safety": interval(numbers.safety if numbers else None),
                "over_refusal": interval(numbers.over_refusal if numbers else None),
                "utility": interval(numbers.utility if numbers else None),
            }
        )
    rule = f"{block.rule}. Picked on the {block.chosen_on} split; numbers of the {split} split."
    return {"rule": rule, "rows": rows}


def _tax(model: ModelEntry, value: float | None) -> str:
    if model.derived is None:
        return ""
    return "n/a" if value is None else _number(value)


def models_view(metrics: Metrics) -> dict:
    recommended = metrics.recommended
    chosen = recommended.label
    runner_up = recommended.runner_up.label if recommended.runner_up is not None else None
    rows = []
    for model in metrics.models:
        label = model.label
        mark = " ★" if label == chosen else " ☆" if label == runner_up else ""
        derived = model.derived
        rows.append(
            {
                "css": "chosen" if label == chosen else "runner" if label == runner_up else "",
                "cells": [
                    label + mark,
                    model.kind,
                    f"{model.alpha:g}" if model.alpha is not None else "",
                    interval(model.safety),
                    interval(model.over_refusal),
                    interval(model.utility),
                    _tax(model, derived.safety_tax if derived else None),
                    _tax(model, derived.refusal_tax if derived else None),
                    "yes" if model.pareto else "",
                ],
            }
        )
    lower = "" if metrics.utility_higher_is_better else " (lower is better)"
    return {
        "caption": f"Whole evaluation sets, 95% Wilson intervals; judge {metrics.judge}, utility "
        f"{metrics.utility_metric}{lower}; derived metrics against {metrics.reference}. ★ recommended, ☆ runner-up.",
        "columns": ["model", "kind", "α", "safety", "over-refusal", "utility", "safety tax", "refusal tax", "Pareto"],
        "rows": rows,
    }


def _sample_row(label: str, name: str, prompt: str, completion: str | None, verdict: str) -> dict:
    return {"model": label, "set": name, "prompt": prompt, "answer": completion or "", "verdict": verdict}


def samples_view(metrics: Metrics) -> dict | None:
    """The sample answers (the first prompts of each set, fixed before evaluation) of the recommended model, else the
    safety adapter, and of the reference."""
    samples = metrics.samples
    shown = metrics.recommended.label or "safety"
    labels = [label for label in dict.fromkeys([shown, metrics.reference]) if label in samples]
    rows = []
    for label in labels:
        sets = samples[label]
        for name, refusals in (("harmful", sets.harmful), ("benign", sets.benign)):
            for row in refusals:
                rows.append(
                    _sample_row(label, name, row.prompt, row.completion, "refused" if row.refused else "answered")
                )
        for sample in sets.utility:
            verdict = f"reference {sample.reference!r}, score {_number(sample.score)}"
            rows.append(_sample_row(label, "utility", sample.prompt, sample.completion, verdict))
    if not rows:
        return None
    return {"caption": "The first prompts of each evaluation set, in file order.", "rows": rows}


def dataset_inputs(metrics: Metrics) -> list[dict]:
    """The evaluation sets as used (after `limit`): rows and the sha256 of those rows."""
    return [
        {"role": f"evaluation: {name}", "name": f"{block.n} rows", "sha256": block.sha256}
        for name, block in metrics.datasets
    ]


def merge_view(
    metrics: Metrics, *, plot_png: bytes | None, inputs: Sequence[Mapping], title: str, subtitle: str = ""
) -> dict:
    """The view of an evaluated merge job (its metrics.json, plot.png and inputs)."""
    recommended = metrics.recommended
    return {
        "title": title,
        "subtitle": subtitle,
        "recommendation": recommendation_view(recommended),
        "prices": prices_view(recommended.price_list),
        "models": models_view(metrics),
        "plot": plot_image(plot_png, "safety against utility and against over-refusal for every evaluated model"),
        "samples": samples_view(metrics),
        "inputs": [*inputs, *dataset_inputs(metrics)],
    }


def _search_rates(block: Mapping | None) -> list[str]:
    block = block or {}
    return [interval(block.get("safety")), interval(block.get("over_refusal")), interval(block.get("utility"))]


def _matched(entry: Mapping) -> str:
    matched = entry.get("matched_linear") or {}
    if not matched.get("matched"):
        low, high = matched.get("reference_safety_range") or (None, None)
        return f"outside linear's front (safety {_number(low)}–{_number(high)})"
    ci = matched.get("delta_over_refusal_ci")
    text = f"{matched['delta_over_refusal']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
    return text + f"; utility {matched['delta_utility']:+.3f}"


def search_view(
    report: Mapping, trials: Sequence[Mapping], *, plot_png: bytes | None, inputs: Sequence[Mapping], title: str
) -> dict:
    """The view of a recipe search (search_report.json, trials.json, plot.png)."""
    chosen = report.get("chosen")
    chosen_number = chosen["trial"] if chosen else None
    confirmed = {entry["trial"]: entry for entry in report.get("pareto", [])}
    if chosen:
        confirmed[chosen["trial"]] = chosen
    matched_rows = [
        {
            "css": "chosen" if number == chosen_number else "",
            "cells": [f"trial {number}", entry["label"], *_search_rates(entry.get("report")), _matched(entry)],
        }
        for number, entry in sorted(confirmed.items())
    ]
    trial_rows = [{"css": "chosen" if t["number"] == chosen_number else "", "cells": _trial_cells(t)} for t in trials]
    settings = report.get("settings") or {}
    sizes = (report.get("splits") or {}).get("sizes") or {}
    split_text = ", ".join(f"{name} {parts['search']}/{parts['report']}" for name, parts in sizes.items())
    count = report.get("trials", {})
    summary = (
        f"{count.get('count')} trials, {count.get('feasible')} within the tolerances (over-refusal "
        f"+{settings.get('max_over_refusal_increase')}, utility −{settings.get('max_utility_drop')}); prompts "
        f"search/report: {split_text}. Objective: {report.get('objective')}."
    )
    recommendation = {
        "label": chosen["label"] if chosen else None,
        "reason": None if chosen else report.get("reason"),
        "rule": report.get("objective"),
        "tolerances": f"over_refusal_increase ≤ {settings.get('max_over_refusal_increase')}, utility_drop ≤ "
        f"{settings.get('max_utility_drop')}",
        "warnings": [report["warning"]] if report.get("warning") else [],
        "notes": [],
        "splits": [
            {
                "label": "★ " + chosen["label"],
                "split": split,
                **dict(zip(("safety", "over_refusal", "utility"), _search_rates(chosen.get(split)))),
                "css": "chosen",
            }
            for split in ("search", "report")
        ]
        if chosen
        else [],
    }
    return {
        "title": title,
        "subtitle": "A recipe search: trials scored on the search split, the choice confirmed on the report split.",
        "recommendation": recommendation,
        "prices": prices_view(SearchPriceList.model_validate(report["price_list"])),
        "plot": plot_image(plot_png, "over-refusal against safety: every trial, and the report split's confirmation"),
        "search": {
            "summary": summary,
            "statement": (report.get("splits") or {}).get("statement", ""),
            "matched": {
                "columns": ["trial", "recipe", "safety", "over-refusal", "utility", "Δ over-refusal vs linear"],
                "rows": matched_rows,
            }
            if matched_rows
            else None,
            "trials": {
                "columns": [
                    "#",
                    "recipe",
                    "safety",
                    "over-refusal",
                    "utility",
                    "utility drop",
                    "over-refusal +",
                    "feasible",
                ],
                "rows": trial_rows,
            },  # fmt: skip
        },
        "inputs": list(inputs),
    }
