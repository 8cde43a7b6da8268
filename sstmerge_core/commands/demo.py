"""`sstmerge demo`: prepare the self-contained example and run the demo job (`example.demo_spec`) on it through
the library; print what came out — the table, the recommendation and why, what the recommended model
says, and where the files are. `sstmerge demo-service` runs the same job through the service and prints the
same summary (`show_results`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource

from ..contracts.metrics import Metrics, Rate, RefusalSample, Utility, UtilitySample

Echo = Callable[[str], None]
SAMPLE_WIDTH = 60
LEGEND = (
    "before = base + utility adapter; safety = base + safety adapter; {merges} = merges with the safety\n"
    "side weighted by α. Safety and over-refusal are refusal rates, utility is {metric}, on the whole held-out\n"
    "sets with 95% intervals; Pareto: no other model is better on all three; ★ recommended, ☆ runner-up."
)


def _rate(block: Rate | Utility) -> str:
    value = block.rate if isinstance(block, Rate) else block.value
    if block.ci_low is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({block.ci_low:.2f}–{block.ci_high:.2f})"


def results_table(metrics: Metrics):
    """A compact rich table of metrics.json (fits 80 columns): model, safety, over-refusal, utility, Pareto."""
    from rich import box
    from rich.table import Table

    recommended = metrics.recommended
    marks = {recommended.label: " ★", recommended.runner_up.label if recommended.runner_up else None: " ☆"}
    marks.pop(None, None)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for column in ("model", "safety", "over-refusal", "utility", "Pareto"):
        table.add_column(column, no_wrap=True)
    for model in metrics.models:
        table.add_row(
            model.label + marks.get(model.label, ""),
            _rate(model.safety),
            _rate(model.over_refusal),
            _rate(model.utility),
            "yes" if model.pareto else "",
        )
    return table


def _clip(text: str, width: int = SAMPLE_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


SAMPLE_SETS = (("harmful", "harmful"), ("benign", "benign"), ("utility", "utility_eval"))
"""(name in metrics.json's `samples`, name of the set in its `splits`)."""


def chosen_samples(metrics: Metrics, label: str) -> dict[str, RefusalSample | UtilitySample]:
    """The sample shown for each set, by a rule fixed before any evaluation: the first row of the set's file
    that lies in the report split, among the rows metrics.json keeps samples of (its first few); the set's
    first row if none of those does. The report split depends only on the prompts and the split seed."""
    samples = metrics.samples.get(label)
    if samples is None:
        return {}
    report = metrics.splits.report_indices
    chosen: dict[str, RefusalSample | UtilitySample] = {}
    for name, set_name in SAMPLE_SETS:
        rows: list[RefusalSample | UtilitySample] = getattr(samples, name)
        if rows:
            in_report = set(getattr(report, set_name))
            chosen[name] = next((row for i, row in enumerate(rows) if i in in_report), rows[0])
    return chosen


def sample_lines(metrics: Metrics, label: str) -> list[str]:
    """What model `label` answered to the held-out prompt `chosen_samples` picks from each set."""
    lines = []
    for name, row in chosen_samples(metrics, label).items():
        if isinstance(row, UtilitySample):
            verdict = f"reference {row.reference!r}"
        else:
            verdict = "refused" if row.refused else "not refused"
        lines.append(f"  {name:<8} {_clip(row.prompt)!r}")
        lines.append(f"  {'':<8} → {_clip(row.completion or '')!r}  ({verdict})")
    return lines


def show_results(metrics: Metrics, echo: Echo = click.echo) -> None:
    """The table, the recommendation and why, and what the recommended model (else the safety adapter) says."""
    from rich.console import Console

    from .options import recommendation_text

    console = Console()
    with console.capture() as table:
        console.print(results_table(metrics))
    echo(table.get().rstrip("\n"))
    echo("")
    methods = dict.fromkeys(m.method for m in metrics.models if m.kind in ("merged", "baseline"))
    echo(LEGEND.format(merges=", ".join(f"{m}@α" for m in methods), metric=metrics.utility_metric))
    echo("")
    echo(recommendation_text(metrics))
    shown = metrics.recommended.label or "safety"
    echo("")
    echo(f"what {shown} answers to held-out prompts:")
    for line in sample_lines(metrics, shown):
        echo(line)


def recommended_adapter(metrics: Metrics, outcome) -> Path | None:
    """The folder of the recommended merge in a `MergeOutcome` (the job's method or a baseline), None if none."""
    method, alpha = metrics.recommended.method, metrics.recommended.alpha
    if metrics.recommended.label is None or alpha is None:
        return None
    by_alpha = outcome.adapter_dirs if method == metrics_main_method(metrics) else None
    if by_alpha is None:
        by_alpha = (getattr(outcome, "baseline_dirs", None) or {}).get(method, {})
    return next((path for a, path in by_alpha.items() if abs(a - alpha) <= 1e-12 * max(1.0, abs(a))), None)


def metrics_main_method(metrics: Metrics) -> str | None:
    """The job's own method: that of its merged (not baseline) entries."""
    return next((m.method for m in metrics.models if m.kind == "merged"), None)


def echo_step(message: str) -> None:
    click.echo(f"  {message}")


@click.command("demo")
@click.option(
    "--workdir",
    default="runs/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the example assets and the merge output go.",
)
@click.option("--device", default="cpu", show_default=True)
def demo(workdir: str, device: str) -> None:
    """Make a tiny model, a utility adapter (a formula task) and a safety adapter (refusals), then run SST-Merge
    over an α sweep against linear and evaluate every merge on held-out prompts. About a minute on a CPU the
    first time (the example is reused afterwards); the tiny model runs on one thread unless --threads says
    otherwise."""
    from ..example import demo_spec, describe_job, one_thread, prepare_example
    from ..pipeline import run_merge
    from .progress import progress_bar

    root = Path(workdir)
    click.echo(f"preparing the example in {root / 'assets'}")
    assets = prepare_example(root / "assets", progress=echo_step)
    spec = demo_spec(assets, root / "cache", device=device)
    click.echo(describe_job(assets))
    threads_given = click.get_current_context().get_parameter_source("threads") not in (None, ParameterSource.DEFAULT)
    with contextlib.nullcontext() if threads_given else one_thread(), progress_bar() as report:
        outcome = run_merge(spec, root / "merge", progress=report)
    assert outcome.metrics_path is not None, "the demo job has an evaluation"
    metrics = Metrics.model_validate_json(outcome.metrics_path.read_bytes())
    click.echo("")
    show_results(metrics)
    click.echo("")
    adapter = recommended_adapter(metrics, outcome)
    if adapter is None:
        click.echo("recommended adapter: none (nothing qualified); every merge is under the folder below")
    else:
        click.echo(f"recommended adapter: {adapter}  (PeftModel.from_pretrained(base, this folder))")
    click.echo(f"base model: {assets.base}")
    click.echo(f"every merge, metrics.json, plot.png, merge_report.json: {outcome.out_dir}")
    click.echo(f"the report (open it in a browser): {outcome.html_path}")
