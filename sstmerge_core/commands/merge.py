"""`sstmerge merge`: run SST-Merge or a baseline (and optionally the evaluation) from the command line, or
re-run a `merge_spec.json` with `--spec`.

The method-parameter flags are generated from the method catalogue's pydantic models (with each method's
default in `--help`), so a new parameter appears here, in the API schema and in the model card without being
repeated by hand.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import click
from pydantic import ValidationError

from ..errors import InputError
from ..methods.catalog import METHOD_PARAMS, REPAIRS
from .options import FC, evaluation_options, evaluation_spec, metrics_table, one_line, progress_bar

# Fields set by dedicated flags rather than generated ones.
_SPECIAL = {"alphas"}


@dataclass(frozen=True)
class ParamField:
    """One method parameter as a flag: its type, help text, and default per method that takes it."""

    annotation: object
    description: str
    defaults: dict[str, object]  # method → default

    @property
    def methods(self) -> list[str]:
        return list(self.defaults)

    def default_text(self) -> str:
        """`0.5`, or `sst: 10, ties: 0.5` when the methods' defaults differ."""
        shown = {method: "none" if d is None else str(d) for method, d in self.defaults.items()}
        values = set(shown.values())
        return values.pop() if len(values) == 1 else ", ".join(f"{m}: {v}" for m, v in shown.items())


def _param_fields() -> dict[str, ParamField]:
    """Union over methods of their parameter fields (the α sweep has its own flag)."""
    fields: dict[str, ParamField] = {}
    for method, model in METHOD_PARAMS.items():
        for name, info in model.model_fields.items():
            if name in _SPECIAL:
                continue
            field = fields.setdefault(name, ParamField(info.annotation, info.description or "", {}))
            field.defaults[method] = info.get_default(call_default_factory=True)
    return fields


def _inner(annotation: object) -> object:
    """The annotation without `| None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0]
    return annotation


def _click_type(annotation: object) -> click.ParamType | type:
    annotation = _inner(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(annotation)])
    if origin is list:
        return _click_type(typing.get_args(annotation)[0])
    return annotation if annotation in (int, float, str, bool) else str


def is_repeatable(annotation: object) -> bool:
    """A list field: a repeatable flag."""
    return typing.get_origin(_inner(annotation)) is list


def field_option(name: str, annotation: object, help: str, *, prefix: str = "") -> typing.Callable[[FC], FC]:
    """`--<prefix><name>` (underscores as dashes) for a parameter-model field, into `<prefix><name>`: the field's
    click type, repeatable for a list; unset it stays None, so that a flag that does not apply can be refused."""
    return click.option(
        f"--{(prefix + name).replace('_', '-')}",
        prefix + name,
        type=_click_type(annotation),
        multiple=is_repeatable(annotation),
        default=None,
        help=help,
    )


def method_param_options(command: FC) -> FC:
    """Add `--<param>` for every method parameter (a list parameter is a repeatable flag); `--help` shows each
    method's default. Unset flags stay None, so that a flag that does not apply to the method can be refused."""
    methods_all = set(METHOD_PARAMS)
    for name, field in sorted(_param_fields().items(), reverse=True):
        scope = "all methods" if set(field.methods) == methods_all else "method " + "/".join(field.methods)
        repeatable = is_repeatable(field.annotation)
        notes = [scope, *(["repeatable"] if repeatable else []), f"default: {field.default_text()}"]
        command = field_option(name, field.annotation, f"{field.description} [{'; '.join(notes)}]")(command)
    return command


REPAIR_PREFIX = "repair_"


def repair_param_options(command: FC) -> FC:
    """`--repair STEP`, its data flags, and `--repair-<param>` for every parameter of every repair step."""
    fields: dict[str, ParamField] = {}
    for step in REPAIRS.values():
        for name, info in step.params.model_fields.items():
            field = fields.setdefault(name, ParamField(info.annotation, info.description or "", {}))
            field.defaults[step.name] = info.get_default(call_default_factory=True)
    for name, field in sorted(fields.items(), reverse=True):
        text = f"{field.description} [repair {'/'.join(field.methods)}; default: {field.default_text()}]"
        command = field_option(name, field.annotation, text, prefix=REPAIR_PREFIX)(command)
    for flag, text in (
        ("--borderline-data", "Repair: borderline-benign prompts P (JSONL/CSV), held out from evaluation."),
        ("--harmless-data", "Repair: harmless prompts B (JSONL/CSV), held out from evaluation."),
    ):
        command = click.option(flag, type=click.Path(), help=text)(command)
    return click.option(
        "--repair",
        type=click.Choice(sorted(REPAIRS)),
        default=None,
        help="A post-merge repair step applied to every merged model (docs/repair.md); refusal_ablation reads "
        "--safety-data (harmful prompts and their refusals), --harmless-data and --borderline-data; calibration "
        "reads --safety-data and --borderline-data, and --utility-data (retain rows) and --harmless-data when given.",
    )(command)


def given_repair(options: dict) -> dict | None:
    """The repair step and its parameters as given, or None; a repair parameter without --repair is an error."""
    params = {
        k.removeprefix(REPAIR_PREFIX): list(v) if isinstance(v, tuple) else v
        for k, v in options.items()
        if k.startswith(REPAIR_PREFIX) and v is not None and v != ()
    }
    if options.get("repair") is None:
        if params or options.get("harmless_data") or options.get("borderline_data"):
            raise InputError("--repair-*, --harmless-data and --borderline-data need --repair")
        return None
    foreign = [k for k in params if k not in REPAIRS[options["repair"]].params.model_fields]
    if foreign:
        raise InputError(f"--repair-{foreign[0].replace('_', '-')} does not apply to repair step {options['repair']}")
    return {"method": options["repair"], "params": params}


def given_params(options: dict) -> dict:
    """The method-parameter flags actually given (a repeatable flag as a list)."""
    fields = _param_fields()
    params = {}
    for key, value in options.items():
        if key not in fields or value is None or value == ():
            continue
        params[key] = list(value) if isinstance(value, tuple) else value
    return params


# Flags that may go with --spec: where to write and what to run on; everything else is the recipe's.
SPEC_COMPATIBLE = {"spec_file", "out", "overwrite", "device", "cache_dir"}


def _check_spec_alone(ctx: click.Context) -> None:
    for param in ctx.command.params:
        if param.name in SPEC_COMPATIBLE:
            continue
        if ctx.get_parameter_source(param.name) in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        ):
            flag = param.opts[0]
            raise InputError(f"{flag} cannot be combined with --spec (the spec file holds the recipe)")


def parse_weighted(value: str, flag: str) -> tuple[str, float]:
    """`DIR[:WEIGHT]` → (DIR, WEIGHT); the weight must be a finite number."""
    path, sep, weight = value.rpartition(":")
    if not sep or not weight or "/" in weight:
        return value, 1.0
    try:
        w = float(weight)
    except ValueError:
        return value, 1.0
    if not math.isfinite(w):
        raise InputError(f"{flag} {value}: the weight must be a finite number")
    return path, w


@click.command("merge")
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(dir_okay=False),
    help="Re-run a merge_spec.json (written beside every result) instead of giving the recipe as flags; relative "
    "paths in it are read from its folder and every recorded sha256 is checked. Combines with --out, --overwrite, "
    "--device and --cache-dir only.",
)
@click.option("--base", "base", help="Base model: a local folder or a Hub id org/name[@revision].")
@click.option("--utility", multiple=True, metavar="DIR[:WEIGHT]", help="Utility LoRA adapter (repeatable).")
@click.option(
    "--safety",
    multiple=True,
    metavar="DIR[:WEIGHT]",
    help="Safety LoRA adapter (repeatable; several are summed with their weights).",
)
@click.option("--utility-data", type=click.Path(), help="JSONL/CSV utility/retain prompts (responses optional).")
@click.option("--safety-data", type=click.Path(), help="JSONL/CSV harmful prompts with safe responses.")
@click.option("--method", default="sst", show_default=True, type=click.Choice(sorted(METHOD_PARAMS)))
@click.option(
    "--alpha",
    "alphas",
    multiple=True,
    type=float,
    help="Weight α of the safety side (repeatable: a sweep writes one adapter per α). [default: 1.0]",
)
@click.option(
    "--compare-with",
    multiple=True,
    type=click.Choice(sorted(METHOD_PARAMS)),
    help="Also merge (and evaluate) with these methods at the same α values (repeatable).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already exists.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Model dtype for data passes.",
)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Fisher factor cache [default: ~/.cache/sstmerge].")
@click.option("--evaluate", "do_evaluate", is_flag=True, help="Evaluate base, before, safety, merged and baselines.")
@evaluation_options(required=False)
@method_param_options
@repair_param_options
@click.pass_context
def merge(ctx: click.Context, spec_file, out, overwrite, device, cache_dir, **recipe) -> None:
    """Merge utility and safety LoRA adapters with SST-Merge (default) or a baseline."""
    from ..pipeline import run_merge

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise InputError(f"--out {out} exists and is not empty (use --overwrite to replace it)")
    if spec_file:
        from ..specfile import read_spec_file

        _check_spec_alone(ctx)
        spec = read_spec_file(spec_file, device=device, cache_dir=cache_dir)
    else:
        spec = spec_from_flags(recipe, device=device, cache_dir=cache_dir)
    with progress_bar() as report:
        outcome = run_merge(spec, out_path, progress=report)
    click.echo(f"wrote {outcome.out_dir}")
    for alpha, folder in outcome.adapter_dirs.items():
        click.echo(f"  α={alpha:g}: {folder}")
    click.echo(f"  report: {outcome.report_path}")
    if outcome.metrics_path:
        from rich.console import Console

        from ..contracts.metrics import Metrics

        Console().print(metrics_table(Metrics.model_validate_json(outcome.metrics_path.read_bytes())))
        click.echo(f"  metrics: {outcome.metrics_path}  plot: {outcome.plot_path}")
        click.echo(f"  report (open it in a browser): {outcome.html_path}")
    click.echo(f"  re-run: sstmerge merge --spec {outcome.spec_path} --out DIR")


def spec_from_flags(flags: dict, *, device: str, cache_dir: str | None):
    """The `MergeSpec` of the recipe flags; one-line `InputError` / usage errors for what is missing or wrong."""
    from ..jobspec import AdapterInput, MergeSpec

    for flag, key in (("--base", "base"), ("--safety", "safety")):
        if not flags[key]:
            raise click.UsageError(f"Missing option '{flag}' (or give --spec FILE).")
    method = flags["method"]
    evaluation = evaluation_spec(flags) if flags["do_evaluate"] else None
    params = given_params(flags)
    params["alphas"] = list(flags["alphas"]) or [1.0]
    foreign = [k for k in params if k not in METHOD_PARAMS[method].model_fields]
    if foreign:
        raise InputError(f"--{foreign[0].replace('_', '-')} does not apply to method {method}")

    def adapters(values: tuple[str, ...], flag: str) -> list[AdapterInput]:
        return [AdapterInput(path=p, weight=w) for p, w in (parse_weighted(v, flag) for v in values)]

    try:
        return MergeSpec(
            base_model=flags["base"],
            utility=adapters(flags["utility"], "--utility"),
            safety=adapters(flags["safety"], "--safety"),
            utility_data=flags["utility_data"],
            safety_data=flags["safety_data"],
            method=method,
            params=params,
            compare_with=list(flags["compare_with"]),
            repair=given_repair(flags),
            harmless_data=flags["harmless_data"],
            borderline_data=flags["borderline_data"],
            evaluation=evaluation,
            device=device,
            dtype=flags["dtype"],
            cache_dir=cache_dir,
        )
    except ValidationError as exc:
        raise InputError(one_line(exc)) from None
