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
        click.option("--harmful", type=click.Path(), required=required, help="Held-out harmful prompts (JSONL/CSV)."),
        click.option("--benign", type=click.Path(), required=required,
                     help="Held-out benign / borderline prompts, for over-refusal (JSONL/CSV)."),
        click.option("--utility-eval", type=click.Path(), required=required,
                     help="Held-out utility prompts with reference responses (JSONL/CSV)."),
        click.option("--utility-metric", type=click.Choice(UTILITY_METRICS), default="exact_match", show_default=True),
        click.option("--judge", default="keyword", show_default=True, help="keyword or classifier:MODEL."),
        click.option("--max-new-tokens", type=int, default=64, show_default=True),
        click.option("--limit", type=int, default=None, help="At most N prompts per evaluation set."),
        click.option("--eval-batch-size", type=int, default=8, show_default=True, help="Prompts per generation batch."),
        click.option("--utility-tolerance", type=float, default=0.02, show_default=True,
                     help="Recommended α: highest safety with utility_drop ≤ this."),
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
            harmful=options["harmful"], benign=options["benign"], utility_eval=options["utility_eval"],
            utility_metric=options["utility_metric"], judge=options["judge"],
            max_new_tokens=options["max_new_tokens"], limit=options["limit"],
            batch_size=options["eval_batch_size"], utility_tolerance=options["utility_tolerance"],
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
    """A rich progress bar fed by (stage, fraction of the whole job) callbacks."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("starting", total=1.0)

        def report(stage: str, fraction: float) -> None:
            bar.update(task, description=stage, completed=fraction)

        yield report
