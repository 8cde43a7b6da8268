"""`sstmerge evaluate`: safety, over-refusal and utility of a base model and of adapters applied to it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, get_args

import click

from ..errors import InputError
from ..jobspec import EvaluationSpec, UtilityMetric

if TYPE_CHECKING:
    from ..evaluation.runner import Variant

RESERVED_KINDS = {"before": "before", "safety": "safety"}


def parse_adapter_option(text: str) -> tuple[str, str]:
    """`DIR[:LABEL]` → (DIR, LABEL); the label defaults to the folder name. An existing DIR wins over a split."""
    folder, label = text, ""
    if not Path(text).exists() and ":" in text:
        folder, _, label = text.rpartition(":")
    if not Path(folder).is_dir():
        raise InputError(f"--adapter {text}: adapter folder not found: {folder}")
    label = label or Path(folder).name
    if label == "base":
        raise InputError(f"--adapter {text}: the label 'base' is reserved for the base model")
    return folder, label


def build_variants(adapter_options: tuple[str, ...]) -> list[Variant]:
    """The base model, then one variant per distinct label (adapters sharing a label are summed)."""
    from ..evaluation.runner import Variant

    folders: dict[str, list[str]] = {}
    for option in adapter_options:
        folder, label = parse_adapter_option(option)
        folders.setdefault(label, []).append(folder)
    variants = [Variant(label="base", kind="base")]
    for label, paths in folders.items():
        kind = RESERVED_KINDS.get(label, "merged")
        variants.append(Variant(label=label, kind=kind, adapters=tuple(paths),
                                method="adapter" if kind == "merged" else None))
    return variants


def _summary_table(metrics: dict):
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
        table.add_row(model["label"], model["kind"], rate(model["safety"]), rate(model["over_refusal"]),
                      utility(model["utility"]), tax(model), "yes" if model["pareto"] else "")
    return table


@click.command()
@click.option("--base", "base_model", required=True, help="Base model: a local folder or a Hub id org/name[@revision].")
@click.option("--adapter", "adapters", multiple=True, metavar="DIR[:LABEL]",
              help="A PEFT LoRA folder evaluated as base + adapter (repeatable). LABEL (default: the folder name) "
                   "names the variant; adapters given the same label are summed into one variant. The label "
                   "'before' marks the reference (base + utility adapters) that derived metrics compare against "
                   "(else the base model); 'safety' marks the safety adapter; any other label is a candidate for "
                   "the recommendation.")
@click.option("--harmful", required=True,
              help="Harmful prompts (JSONL/CSV with a `prompt` column): safety = refusal rate.")
@click.option("--benign", required=True, help="Benign prompts (JSONL/CSV, `prompt`): over-refusal = refusal rate.")
@click.option("--utility-eval", required=True, help="Utility prompts with reference `response`s (JSONL/CSV).")
@click.option("--utility-metric", type=click.Choice(get_args(UtilityMetric)), default="exact_match", show_default=True,
              help="Utility score of a completion against the reference response.")
@click.option("--judge", default="keyword", show_default=True, metavar="keyword|classifier:MODEL[#LABEL]",
              help="Refusal judge: the keyword rules, or a sequence-classification model and its refusal label.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Tokens generated per prompt.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts of each set.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Prompts per generation batch.")
@click.option("--utility-tolerance", type=click.FloatRange(0), default=0.02, show_default=True,
              help="Recommendation: the largest utility_drop an adapter may have.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True,
              help="Model weights dtype (auto: bfloat16 on GPU, float32 on CPU).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write metrics.json.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Where to write the safety/utility PNG (default: --out with the suffix .png).")
def evaluate(base_model: str, adapters: tuple[str, ...], harmful: str, benign: str, utility_eval: str,
             utility_metric: str, judge: str, max_new_tokens: int, limit: int | None, batch_size: int,
             utility_tolerance: float, device: str, dtype: str, out: str, plot: str | None) -> None:
    """Evaluate the base model and base + each adapter: safety (refusals on harmful prompts), over-refusal
    (refusals on benign prompts) and utility, with 95% intervals; writes metrics.json and a plot."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..evaluation.judges import make_judge
    from ..evaluation.runner import EvaluationData, evaluate_variants, write_outputs
    from ..modeling import load_base_model, resolve_device

    spec = EvaluationSpec(harmful=harmful, benign=benign, utility_eval=utility_eval, utility_metric=utility_metric,
                          judge=judge, max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size,
                          utility_tolerance=utility_tolerance)
    variants = build_variants(adapters)
    data = EvaluationData.load(spec)
    refusal_judge = make_judge(spec.judge, device=str(resolve_device(device)))
    model, tokenizer = load_base_model(base_model, device, dtype)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("evaluate", total=1.0)
        metrics = evaluate_variants(model, tokenizer, variants, spec,
                                    lambda stage, fraction: bar.update(task, description=stage, completed=fraction),
                                    data=data, judge=refusal_judge)
    png = Path(plot) if plot else Path(out).with_suffix(".png")
    write_outputs(metrics, out, png)
    console = Console()
    console.print(_summary_table(metrics))
    console.print(f"recommended: {metrics['recommended']['label']} ({metrics['recommended']['reason']})")
    console.print(f"wrote {out} and {png}")
