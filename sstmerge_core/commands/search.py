"""`sstmerge search`: a budgeted, constrained search over merge recipes (docs/search.md).

The search flags are generated from `SearchSettings` and the fixed data-pass flags from SST's parameters, so
the CLI, the API's `search` object and the docs read one declaration.
"""

from __future__ import annotations

import typing
from pathlib import Path

import click
from pydantic import BaseModel, ValidationError

from ..errors import InputError
from ..methods.catalog import FisherParams
from ..search.space import EVALUATION_NAMES, SearchSettings, from_evaluation
from .merge import field_option, parse_weighted
from .options import FC, evaluation_options, evaluation_spec, one_line, progress_bar

# The data-pass settings every SST trial shares: FisherParams' own fields (the sampled Fisher keeps seed 0).
FIXED = {name: FisherParams.model_fields[name] for name in FisherParams.__annotations__}
# The split and the tolerances come from the evaluation flags (--split-seed, --report-fraction,
# --utility-tolerance, --over-refusal-tolerance): one flag per concept.
SEARCH_FLAGS = {k: v for k, v in SearchSettings.model_fields.items() if k not in EVALUATION_NAMES}


def model_options(model: type[BaseModel], names: dict, *, note: str) -> typing.Callable[[FC], FC]:
    """`--<field>` for every field of `model` in `names` (a list field is a repeatable flag), default shown."""

    def decorate(command: FC) -> FC:
        for name, info in sorted(names.items(), reverse=True):
            default = info.get_default(call_default_factory=True)
            command = field_option(name, info.annotation, f"{info.description} [{note}; default: {default}]")(command)
        return command

    return decorate


def given(options: dict, names: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if k in names and v not in (None, ())}


@click.command("search")
@click.option("--base", required=True, help="Base model: a local folder or a Hub id org/name[@revision].")
@click.option("--utility", multiple=True, metavar="DIR[:WEIGHT]", help="Utility LoRA adapter (repeatable).")
@click.option("--safety", multiple=True, required=True, metavar="DIR[:WEIGHT]", help="Safety LoRA adapter.")
@click.option("--utility-data", type=click.Path(), help="Utility/retain prompts (SST's utility Fisher).")
@click.option("--safety-data", type=click.Path(), help="Harmful prompts with refusals (SST, and the repair's H).")
@click.option(
    "--harmless-data", type=click.Path(), help="Repair: harmless prompts B (with P: the ablation and alignment)."
)
@click.option("--borderline-data", type=click.Path(), help="Repair: borderline-benign prompts P (enables calibration).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already exists.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"])
)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Fisher factor cache [default: ~/.cache/sstmerge].")
@evaluation_options(required=True)
@model_options(FisherParams, FIXED, note="fixed in every trial")
@model_options(SearchSettings, SEARCH_FLAGS, note="search")
def search(out, overwrite, device, cache_dir, **flags) -> None:
    """Search merge recipes (method, α, depth schedule, SST's β/k, a repair step and its knobs) for the
    highest safety within your tolerances (--over-refusal-tolerance, --utility-tolerance), scored on a search split
    of the evaluation sets and confirmed on a report split the search never saw."""
    from ..jobspec import DATA_INPUTS, AdapterInput, MergeSpec
    from ..search.runner import run_search
    from ..search.space import search_repair

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise InputError(f"--out {out} exists and is not empty (use --overwrite to replace it)")
    try:
        evaluation = evaluation_spec(flags)
        settings = from_evaluation(SearchSettings(**given(flags, SEARCH_FLAGS)), evaluation)
    except ValidationError as exc:
        raise InputError(one_line(exc)) from None
    needs_fisher = "sst" in settings.methods
    given_data = {key for key in DATA_INPUTS if flags[key]}

    def adapters(values: tuple[str, ...], flag: str) -> list[AdapterInput]:
        return [AdapterInput(path=p, weight=w) for p, w in (parse_weighted(v, flag) for v in values)]

    try:
        spec = MergeSpec(
            base_model=flags["base"],
            utility=adapters(flags["utility"], "--utility"),
            safety=adapters(flags["safety"], "--safety"),
            utility_data=flags["utility_data"],
            safety_data=flags["safety_data"],
            method="sst" if needs_fisher else settings.methods[0],
            params=given(flags, FIXED) if needs_fisher else {},
            repair=search_repair(settings, given_data),
            harmless_data=flags["harmless_data"],
            borderline_data=flags["borderline_data"],
            evaluation=evaluation,
            device=device,
            dtype=flags["dtype"],
            cache_dir=cache_dir,
        )
    except ValidationError as exc:
        raise InputError(one_line(exc)) from None
    with progress_bar() as report:
        outcome = run_search(spec, settings, out_path, progress=report)
    click.echo(summary_text(outcome.report))
    click.echo(f"wrote {outcome.out_dir} (search_report.json, trials.json, plot.png)")
    click.echo(f"  report: {outcome.out_dir / 'report.html'}")
    if outcome.spec_path is not None:
        click.echo(f"  chosen adapter: {outcome.adapter_dir}")
        click.echo(f"  re-run: sstmerge merge --spec {outcome.spec_path} --out DIR")


def _rates(block: dict) -> str:
    s, o, u = block["safety"], block["over_refusal"], block["utility"]
    return (
        f"safety {s['rate']:.3f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}], over-refusal {o['rate']:.3f} "
        f"[{o['ci_low']:.2f}, {o['ci_high']:.2f}], utility {u['value']:.3f} (n={s['n']}/{o['n']}/{u['n']})"
    )


def summary_text(report: typing.Mapping[str, typing.Any]) -> str:
    """What a user reads after a search: the split sizes, the choice on the search split and what the report split
    says of it, against linear at the same safety."""
    sizes = report["splits"]["sizes"]
    lines = [
        f"{report['trials']['count']} trials, {report['trials']['feasible']} within the tolerances "
        f"(over-refusal +{report['settings']['max_over_refusal_increase']:g}, "
        f"utility −{report['settings']['max_utility_drop']:g}); splits search/report: "
        + ", ".join(f"{name} {parts['search']}/{parts['report']}" for name, parts in sizes.items()),
        f"before (report split): {_rates(report['references']['report']['before'])}",
    ]
    from ..contracts.summary import SearchPriceList
    from ..evaluation.pricing import price_lines

    prices = price_lines(SearchPriceList.model_validate(report["price_list"]))
    chosen = report["chosen"]
    if chosen is None:
        return "\n".join([*lines, f"nothing recommended: {report['reason']}", *prices])
    lines.append(f"chosen: {chosen['label']}")
    lines.append(f"  search split: {_rates(chosen['search'])}")
    lines.append(f"  report split: {_rates(chosen['report'])}")
    matched = chosen["matched_linear"]
    if matched["matched"]:
        ci = matched["delta_over_refusal_ci"]
        interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        lines.append(
            f"  vs linear at the same safety (report split): over-refusal {matched['delta_over_refusal']:+.3f}"
            f"{interval} (paired bootstrap), utility {matched['delta_utility']:+.3f}"
        )
    else:
        low, high = matched["reference_safety_range"]
        lines.append(f"  linear's front covers safety {low:.3f}–{high:.3f} only: no matched comparison")
    if report.get("warning"):
        lines.append(report["warning"])
    return "\n".join([*lines, *prices])
