"""Flags and helpers shared by the CLI commands: evaluation flags, one-line errors, progress bars (`progress`)."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from ..contracts.metrics import Derived, Metrics, Numbers, Rate, Utility
from ..errors import InputError
from .progress import progress_bar  # noqa: F401  (re-exported for the commands)


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

#: Evaluation settings whose flag is not `--<field>`: `--batch-size` is the Fisher pass's in `merge`.
SETTING_FLAGS = {"batch_size": "eval_batch_size"}


def setting_flag(field: str) -> str:
    """The option name (click's destination) of an `EvaluationSettings` field."""
    return SETTING_FLAGS.get(field, field)


def _bounds(info: FieldInfo) -> dict[str, Any]:
    """click range arguments from a field's `ge`/`gt`/`le`/`lt`."""
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for attribute, key, is_open in (
            ("ge", "min", False),
            ("gt", "min", True),
            ("le", "max", False),
            ("lt", "max", True),
        ):
            value = getattr(item, attribute, None)
            if value is not None:
                bounds[key] = value
                bounds[f"{key}_open"] = is_open
    return bounds


def setting_type(info: FieldInfo) -> click.ParamType:
    """The click type of an evaluation-setting field: a Literal's choices, an int/float range from its bounds, a
    positive integer or `auto` for a batch size, else a string (pydantic checks the rest)."""
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if any(typing.get_origin(a) is typing.Literal and typing.get_args(a) == ("auto",) for a in options):
            return BATCH_SIZE
        (annotation,) = options
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(annotation)])
    if annotation in (int, float):
        bounds = _bounds(info)
        if annotation is int:
            return click.IntRange(**bounds)
        return click.FloatRange(**bounds)
    return click.STRING


def _setting_help(name: str, info: FieldInfo) -> str:
    text = info.description or name.replace("_", " ")
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def evaluation_options(required: bool) -> Callable[[FC], FC]:
    """--harmful/--benign/--utility-eval, then one flag per `EvaluationSettings` field (sstmerge_core/evaluation/
    README.md): its type, range, default and help are the field's, so a new setting is a flag without more code."""
    from ..evaluation.judges import judge_syntax
    from ..jobspec import EvaluationSettings

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
    ]
    metavars = {"judge": judge_syntax(), "batch_size": BATCH_SIZE.name}
    for name, info in EvaluationSettings.model_fields.items():
        dest = setting_flag(name)
        flags.append(
            click.option(
                f"--{dest.replace('_', '-')}",
                dest,
                type=setting_type(info),
                default=info.default,
                show_default=info.default is not None,
                metavar=metavars.get(name),
                help=_setting_help(name, info),
            )
        )

    def decorate(command: FC) -> FC:
        for flag in reversed(flags):
            command = flag(command)
        return command

    return decorate


def evaluation_spec(options: dict):
    """An `EvaluationSpec` from the evaluation flags (all three data sets required)."""
    from ..jobspec import EvaluationSettings, EvaluationSpec

    missing = [f"--{k.replace('_', '-')}" for k in ("harmful", "benign", "utility_eval") if not options.get(k)]
    if missing:
        raise InputError(f"evaluation needs {', '.join(missing)}")
    settings = {name: options[setting_flag(name)] for name in EvaluationSettings.model_fields}
    try:
        return EvaluationSpec(
            harmful=options["harmful"], benign=options["benign"], utility_eval=options["utility_eval"], **settings
        )
    except ValidationError as exc:
        raise InputError(one_line(exc)) from None


def one_line(exc: ValidationError) -> str:
    """The first pydantic error as `field: message`."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "input"
    return f"{where}: {error['msg']}"


def metrics_table(metrics: Metrics):
    """metrics.json for the console: one row per evaluated model (whole sets), then the recommendation — its rule
    and tolerances, the chosen model and the runner-up with their search- and report-split numbers."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def rate(block: Rate) -> str:
        return f"{block.rate:.3f} [{block.ci_low:.2f}, {block.ci_high:.2f}]"

    def utility(block: Utility) -> str:
        interval = "" if block.ci_low is None else f" [{block.ci_low:.2f}, {block.ci_high:.2f}]"
        return f"{block.value:.3f}{interval}"

    def tax(value: float | None, derived: Derived | None) -> str:
        if derived is None:
            return ""
        return "n/a" if value is None else f"{value:.3f}"

    recommended = metrics.recommended
    runner_up = recommended.runner_up.label if recommended.runner_up is not None else None
    table = Table(title=f"judge: {metrics.judge}, utility: {metrics.utility_metric} (whole evaluation sets)")
    for column in ("model", "kind", "safety", "over-refusal", "utility", "safety tax", "refusal tax", "Pareto"):
        table.add_column(column)
    for model in metrics.models:
        mark = {recommended.label: " ★", runner_up: " ☆"}
        derived = model.derived
        table.add_row(
            model.label + mark.get(model.label, ""),
            model.kind,
            rate(model.safety),
            rate(model.over_refusal),
            utility(model.utility),
            tax(derived.safety_tax if derived else None, derived),
            tax(derived.refusal_tax if derived else None, derived),
            "yes" if model.pareto else "",
        )
    return Group(table, Text(recommendation_text(metrics)))


def _split_numbers(numbers: Numbers | None) -> str:
    if numbers is None:
        return "—"
    return (
        f"safety {numbers.safety.rate:.3f}, over-refusal {numbers.over_refusal.rate:.3f}, "
        f"utility {numbers.utility.value:.3f} (n = {numbers.safety.n}/{numbers.over_refusal.n}/"
        f"{numbers.utility.n})"
    )


def recommendation_text(metrics: Metrics) -> str:
    """The recommendation in a few lines: rule, tolerances, chosen model (★) and runner-up (☆) on both splits."""
    from ..evaluation.pricing import notice_lines, price_lines

    recommended = metrics.recommended
    tolerances = recommended.tolerances
    cap = tolerances.over_refusal_at_most_safety_adapter
    increase = tolerances.over_refusal_increase
    lines = [
        f"rule: {recommended.rule}",
        "tolerances: utility_drop ≤ {}, over_refusal_increase ≤ {}, over-refusal cap {}".format(
            tolerances.utility_drop,
            "unbounded" if increase is None else increase,
            "—" if cap is None else f"{cap:.3f} (the safety adapter's)",
        ),
    ]
    if recommended.label is None:
        lines.append(f"recommended: none — {recommended.reason}")
    else:
        lines += [
            f"recommended ★: {recommended.label} — {recommended.reason}",
            f"  search: {_split_numbers(recommended.search)}",
            f"  report: {_split_numbers(recommended.report)}",
        ]
    runner_up = recommended.runner_up
    if runner_up:
        lines += [
            f"runner-up ☆: {runner_up.label}",
            f"  search: {_split_numbers(runner_up.search)}",
            f"  report: {_split_numbers(runner_up.report)}",
        ]
    elif recommended.label is not None:
        lines.append("runner-up: none (one merge qualified)")
    return "\n".join(lines + notice_lines(recommended) + price_lines(recommended.price_list))
