"""Flags and helpers shared by the CLI commands: evaluation flags, one-line errors, progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import click
from pydantic import ValidationError

from ..errors import InputError

UTILITY_METRICS = ["exact_match", "contains", "rouge_l", "nll"]


def evaluation_options(required: bool) -> Callable[[click.Command], click.Command]:
    """--harmful/--benign/--utility-eval and the judging/generation settings of SPEC §5."""
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
        click.option("--utility-metric", type=click.Choice(UTILITY_METRICS), default="exact_match", show_default=True),
        click.option(
            "--judge",
            default="keyword",
            show_default=True,
            metavar="keyword|classifier:MODEL[#LABEL]",
            help="Refusal judge: the keyword rules, or a sequence-classification model and its refusal label.",
        ),
        click.option(
            "--max-new-tokens",
            type=click.IntRange(1, 4096),
            default=64,
            show_default=True,
            help="Tokens generated per prompt (greedy).",
        ),
        click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts of each set."),
        click.option(
            "--eval-batch-size",
            type=click.IntRange(1),
            default=8,
            show_default=True,
            help="Prompts per generation batch.",
        ),
        click.option(
            "--utility-tolerance",
            type=click.FloatRange(0),
            default=0.02,
            show_default=True,
            help="Recommended α: the highest safety among merges with utility_drop ≤ this.",
        ),
        click.option(
            "--over-refusal-tolerance",
            type=click.FloatRange(0),
            default=None,
            help="Recommended α: also require over_refusal_increase ≤ this (default: unbounded).",
        ),
    ]

    def decorate(command: click.Command) -> click.Command:
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
            batch_size=options["eval_batch_size"],
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


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[str, float], None]]:
    """A rich progress bar on stdout fed by (stage, fraction of the whole job) callbacks (errors go to stderr)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("starting", total=1.0)

        def report(stage: str, fraction: float) -> None:
            bar.update(task, description=stage, completed=fraction)

        yield report


def metrics_table(metrics: dict):
    """A rich table of metrics.json: one row per evaluated model."""
    from rich.table import Table

    def rate(block: dict) -> str:
        return f"{block['rate']:.3f} [{block['ci_low']:.2f}, {block['ci_high']:.2f}]"

    def utility(block: dict) -> str:
        interval = "" if block["ci_low"] is None else f" [{block['ci_low']:.2f}, {block['ci_high']:.2f}]"
        return f"{block['value']:.3f}{interval}"

    def tax(model: dict) -> str:
        derived = model["derived"]
        if derived is None:
            return ""
        return "n/a" if derived["safety_tax"] is None else f"{derived['safety_tax']:.3f}"

    table = Table(title=f"judge: {metrics['judge']}, utility: {metrics['utility_metric']}")
    for column in ("model", "kind", "safety", "over-refusal", "utility", "safety tax", "Pareto"):
        table.add_column(column)
    for model in metrics["models"]:
        table.add_row(
            model["label"],
            model["kind"],
            rate(model["safety"]),
            rate(model["over_refusal"]),
            utility(model["utility"]),
            tax(model),
            "yes" if model["pareto"] else "",
        )
    return table
