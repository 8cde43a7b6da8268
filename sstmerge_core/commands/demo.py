"""`sstmerge demo`: prepare the self-contained example and run `merge --evaluate` on it."""

from __future__ import annotations

from pathlib import Path

import click


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
    """Make a tiny model, train utility and safety adapters, and run SST-Merge (α sweep) against linear,
    with the safety/over-refusal/utility evaluation. Takes well under a minute on a CPU."""
    from ..example import prepare_example
    from ..jobspec import EvaluationSpec, MergeSpec
    from ..pipeline import run_merge
    from .options import metrics_table, progress_bar

    root = Path(workdir)
    click.echo(f"preparing example assets in {root / 'assets'}")
    assets = prepare_example(root / "assets")
    spec = MergeSpec(
        base_model=str(assets.base),
        utility=[{"path": str(assets.utility_adapter)}],
        safety=[{"path": str(assets.safety_adapter)}],
        utility_data=str(assets.utility_data),
        safety_data=str(assets.safety_data),
        method="sst",
        params={"alphas": [0.5, 1.0, 2.0], "max_length": 64, "continuation_tokens": 8},
        compare_with=["linear"],
        device=device,
        dtype="float32",
        cache_dir=str(root / "cache"),
        evaluation=EvaluationSpec(
            harmful=str(assets.harmful_eval),
            benign=str(assets.benign_eval),
            utility_eval=str(assets.utility_eval),
            max_new_tokens=8,
        ),
    )
    with progress_bar() as report:
        outcome = run_merge(spec, root / "merge", progress=report)
    import json

    from rich.console import Console

    Console().print(metrics_table(json.loads(outcome.metrics_path.read_text())))
    click.echo(f"merged adapters: {', '.join(str(p) for p in outcome.adapter_dirs.values())}")
    click.echo(f"report: {outcome.report_path}  metrics: {outcome.metrics_path}  plot: {outcome.plot_path}")
