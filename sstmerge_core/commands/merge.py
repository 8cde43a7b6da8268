"""`sstmerge merge`: run SST-Merge or a baseline (and optionally the evaluation) from the command line.

The method-parameter flags are generated from the method registry's pydantic models, so a new
parameter appears here, in the API schema and in the model card without being repeated by hand.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path

import click
from pydantic import ValidationError

from ..errors import InputError
from ..methods.catalog import METHOD_PARAMS
from .options import evaluation_options, evaluation_spec, metrics_table, one_line, progress_bar

# Fields set by dedicated flags rather than generated ones.
_SPECIAL = {"alphas"}


def _param_fields() -> dict[str, tuple[object, str, list[str]]]:
    """Union over methods of their parameter fields: name → (annotation, description, methods using it)."""
    fields: dict[str, tuple[object, str, list[str]]] = {}
    for method, model in METHOD_PARAMS.items():
        for name, info in model.model_fields.items():
            if name in _SPECIAL:
                continue
            annotation, description, methods = fields.get(name, (info.annotation, info.description or "", []))
            fields[name] = (annotation, description, [*methods, method])
    return fields


def _click_type(annotation: object) -> click.ParamType | type:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(annotation)])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _click_type(inner[0])
    return annotation if annotation in (int, float, str, bool) else str


def method_param_options(command: click.Command) -> click.Command:
    """Add `--<param>` for every method parameter (default: the method's own default)."""
    methods_all = set(METHOD_PARAMS)
    for name, (annotation, description, methods) in sorted(_param_fields().items(), reverse=True):
        scope = "all methods" if set(methods) == methods_all else "method " + "/".join(methods)
        command = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=_click_type(annotation),
            default=None,
            help=f"{description} [{scope}]",
        )(command)
    return command


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
@click.option("--base", "base", required=True, help="Base model: a local folder or a Hub id org/name[@revision].")
@click.option("--utility", multiple=True, metavar="DIR[:WEIGHT]", help="Utility LoRA adapter (repeatable).")
@click.option(
    "--safety",
    multiple=True,
    required=True,
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
def merge(
    base,
    utility,
    safety,
    utility_data,
    safety_data,
    method,
    alphas,
    compare_with,
    out,
    overwrite,
    device,
    dtype,
    cache_dir,
    do_evaluate,
    **options,
) -> None:
    """Merge utility and safety LoRA adapters with SST-Merge (default) or a baseline."""
    from ..jobspec import AdapterInput, MergeSpec
    from ..pipeline import run_merge

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise InputError(f"--out {out} exists and is not empty (use --overwrite to replace it)")
    evaluation = evaluation_spec(options) if do_evaluate else None
    params = {k: v for k, v in options.items() if v is not None and k in _param_fields()}
    params["alphas"] = list(alphas) or [1.0]
    foreign = [k for k in params if k not in METHOD_PARAMS[method].model_fields]
    if foreign:
        raise InputError(f"--{foreign[0].replace('_', '-')} does not apply to method {method}")
    try:
        spec = MergeSpec(
            base_model=base,
            utility=[AdapterInput(path=p, weight=w) for p, w in (parse_weighted(u, "--utility") for u in utility)],
            safety=[AdapterInput(path=p, weight=w) for p, w in (parse_weighted(s, "--safety") for s in safety)],
            utility_data=utility_data,
            safety_data=safety_data,
            method=method,
            params=params,
            compare_with=list(compare_with),
            evaluation=evaluation,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
        )
    except ValidationError as exc:
        raise InputError(one_line(exc)) from None
    with progress_bar() as report:
        outcome = run_merge(spec, out_path, progress=report)
    click.echo(f"wrote {outcome.out_dir}")
    for alpha, folder in outcome.adapter_dirs.items():
        click.echo(f"  α={alpha:g}: {folder}")
    click.echo(f"  report: {outcome.report_path}")
    if outcome.metrics_path:
        import json

        from rich.console import Console

        Console().print(metrics_table(json.loads(outcome.metrics_path.read_text())))
        click.echo(f"  metrics: {outcome.metrics_path}  plot: {outcome.plot_path}")
