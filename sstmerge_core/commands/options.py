"""Flags and helpers shared by the CLI commands: evaluation flags, one-line errors, progress bars (`progress`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from ..errors import InputError
from .progress import progress_bar  # noqa: F401  (re-exported for the commands)

UTILITY_METRICS = ["exact_match", "contains", "rouge_l", "nll"]


def _default(field: str):
    """The default of an `EvaluationSettings` field (one source for the CLI, the API and the library)."""
    from ..jobspec import EvaluationSettings

    return EvaluationSettings.model_fields[field].default


class BatchSizeType(click.ParamType):
    """A positive integer or `auto`."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is neither a positive integer nor 'auto'", param, ctx)


BATCH_SIZE = BatchSizeType()


#: What click's option decorators take and give back: a command function, or a command already made.
FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)


def evaluation_options(required: bool) -> Callable[[FC], FC]:
    """--harmful/--benign/--utility-eval and the judging/generation settings (sstmerge_core/evaluation/README.md)."""
    flags = [
        click.option(
            "--harmful",
            type=click.Path(),
            required=required,
            help="Held-out harmful prompts (JSONL/CSV, `prompt`): safety = refusal rate.",
        ),
        click.option(
            "--benign",
            type=click.Path(),
            required=required,
            help="Held-out benign / borderline prompts (JSONL/CSV): over-refusal = refusal rate.",
        ),
        click.option(
            "--utility-eval",
            type=click.Path(),
            required=required,
            help="Held-out utility prompts with reference `response`s (JSONL/CSV).",
        ),
        click.option(
            "--utility-metric",
            type=click.Choice(UTILITY_METRICS),
            default=_default("utility_metric"),
            show_default=True,
            help="Utility score of a completion against the reference response (nll: lower is better).",
        ),
        click.option(
            "--judge",
            default=_default("judge"),
            show_default=True,
            metavar="keyword|classifier:MODEL[#LABEL]",
            help="Refusal judge: the keyword rules, or a sequence-classification model and its refusal label.",
        ),
        click.option(
            "--max-new-tokens",
            type=click.IntRange(1, 4096),
            default=_default("max_new_tokens"),
            show_default=True,
            help="Tokens generated per prompt (greedy).",
        ),
        click.option(
            "--limit",
            type=click.IntRange(1),
            default=None,
            show_default="every row",
            help="Use only the first N prompts of each set.",
        ),
        click.option(
            "--eval-batch-size",
            type=BATCH_SIZE,
            default=_default("batch_size"),
            show_default=True,
            metavar="N|auto",
            help="Prompts per generation batch; auto: the most that fit the memory budget (CUDA: free memory and "
            "the KV cache per sequence; CPU: half the weights' size, at most 64).",
        ),
        click.option(
            "--split-seed",
            type=int,
            default=_default("split_seed"),
            show_default=True,
            help="Seed of the search/report split of every evaluation set.",
        ),
        click.option(
            "--report-fraction",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=_default("report_fraction"),
            show_default=True,
            help="Share of each evaluation set held out for reporting; the recommendation is chosen on the rest.",
        ),
        click.option(
            "--utility-tolerance",
            type=click.FloatRange(0),
            default=_default("utility_tolerance"),
            show_default=True,
            help="Recommendation: utility_drop ≤ this (in the utility metric's units) on the search split.",
        ),
        click.option(
            "--over-refusal-tolerance",
            type=click.FloatRange(0),
            default=_default("over_refusal_tolerance"),
            show_default=True,
            help="Recommendation: over_refusal_increase ≤ this on the search split (1 removes the bound; the "
            "safety adapter's own over-refusal is always a cap).",
        ),
    ]

    def decorate(command: FC) -> FC:
        for flag in reversed(flags):
            command = flag(command)
        return command

    return decorate


def evaluation_spec(options: dict):
    """An `EvaluationSpec` from the evaluation flags (all three data sets required)."""
    from ..jobspec import EvaluationSpec

    missing = [f"--{k.replace('_', '-')}" for k in ("harmful", "benign", "utility_eval") if not options.get(k)]
    if missing:
        raise InputError(f"evaluation needs {', '.join(missing)}")
    try:
        return EvaluationSpec(
            harmful=options["harmful"],
            benign=options["benign"],
            utility_eval=options["utility_eval"],
            utility_metric=options["utility_metric"],
            judge=options["judge"],
            max_new_tokens=options["max_new_tokens"],
            limit=options["limit"],
            batch_size=options.get("eval_batch_size", _default("batch_size")),
            split_seed=options.get("split_seed", _default("split_seed")),
            report_fraction=options.get("report_fraction", _default("report_fraction")),
            utility_tolerance=options["utility_tolerance"],
            over_refusal_tolerance=options["over_refusal_tolerance"],
        )
    except ValidationError as exc:
        raise InputError(one_line(exc)) from None


def one_line(exc: ValidationError) -> str:
    """The first pydantic error as `field: message`."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "input"
    return f"{where}: {error['msg']}"


def metrics_table(metrics: dict):
    """metrics.json for the console: one row per evaluated model (whole sets), then the recommendation — its rule
    and tolerances, the chosen model and the runner-up with their search- and report-split numbers."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def rate(block: dict) -> str:
        return f"{block['rate']:.3f} [{block['ci_low']:.2f}, {block['ci_high']:.2f}]"

    def utility(block: dict) -> str:
        interval = "" if block["ci_low"] is None else f" [{block['ci_low']:.2f}, {block['ci_high']:.2f}]"
        return f"{block['value']:.3f}{interval}"

    def tax(model: dict, name: str) -> str:
        derived = model["derived"]
        if derived is None:
            return ""
        return "n/a" if derived[name] is None else f"{derived[name]:.3f}"

    recommended = metrics.get("recommended") or {}
    table = Table(title=f"judge: {metrics['judge']}, utility: {metrics['utility_metric']} (whole evaluation sets)")
    for column in ("model", "kind", "safety", "over-refusal", "utility", "safety tax", "refusal tax", "Pareto"):
        table.add_column(column)
    for model in metrics["models"]:
        mark = {recommended.get("label"): " ★", (recommended.get("runner_up") or {}).get("label"): " ☆"}
        table.add_row(
            model["label"] + mark.get(model["label"], ""),
            model["kind"],
            rate(model["safety"]),
            rate(model["over_refusal"]),
            utility(model["utility"]),
            tax(model, "safety_tax"),
            tax(model, "refusal_tax"),
            "yes" if model["pareto"] else "",
        )
    return Group(table, Text(recommendation_text(metrics)))


def _split_numbers(numbers: dict | None) -> str:
    if numbers is None:
        return "—"
    return (
        f"safety {numbers['safety']['rate']:.3f}, over-refusal {numbers['over_refusal']['rate']:.3f}, "
        f"utility {numbers['utility']['value']:.3f} (n = {numbers['safety']['n']}/{numbers['over_refusal']['n']}/"
        f"{numbers['utility']['n']})"
    )


def recommendation_text(metrics: dict) -> str:
    """The recommendation in a few lines: rule, tolerances, chosen model (★) and runner-up (☆) on both splits."""
    recommended = metrics.get("recommended")
    if not recommended:
        return "recommended: —"
    tolerances = recommended.get("tolerances") or {}
    cap = tolerances.get("over_refusal_at_most_safety_adapter")
    increase = tolerances.get("over_refusal_increase")
    lines = [
        f"rule: {recommended['rule']}",
        "tolerances: utility_drop ≤ {}, over_refusal_increase ≤ {}, over-refusal cap {}".format(
            tolerances.get("utility_drop"),
            "unbounded" if increase is None else increase,
            "—" if cap is None else f"{cap:.3f} (the safety adapter's)",
        ),
    ]
    if recommended["label"] is None:
        lines.append(f"recommended: none — {recommended['reason']}")
    else:
        lines += [
            f"recommended ★: {recommended['label']} — {recommended['reason']}",
            f"  search: {_split_numbers(recommended.get('search'))}",
            f"  report: {_split_numbers(recommended.get('report'))}",
        ]
    runner_up = recommended.get("runner_up")
    if runner_up:
        lines += [
            f"runner-up ☆: {runner_up['label']}",
            f"  search: {_split_numbers(runner_up.get('search'))}",
            f"  report: {_split_numbers(runner_up.get('report'))}",
        ]
    elif recommended["label"] is not None:
        lines.append("runner-up: none (one merge qualified)")
    from ..evaluation.pricing import notice_lines, price_lines

    return "\n".join(lines + notice_lines(recommended) + price_lines(recommended))
