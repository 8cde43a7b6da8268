"""`sstmerge evaluate`: safety, over-refusal and utility of a base model and of adapters applied to it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import InputError
from .options import evaluation_options, evaluation_spec, metrics_table, progress_bar

if TYPE_CHECKING:
    from ..evaluation.runner import Variant, VariantKind

RESERVED_KINDS: dict[str, VariantKind] = {"before": "before", "safety": "safety"}


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
    from ..jobspec import AdapterInput

    folders: dict[str, list[str]] = {}
    for option in adapter_options:
        folder, label = parse_adapter_option(option)
        folders.setdefault(label, []).append(folder)
    variants = [Variant(label="base", kind="base")]
    for label, paths in folders.items():
        kind = RESERVED_KINDS.get(label, "merged")
        adapters = tuple(AdapterInput(path=path) for path in paths)
        variants.append(
            Variant(label=label, kind=kind, adapters=adapters, method="adapter" if kind == "merged" else None)
        )
    return variants


@click.command()
@click.option("--base", "base_model", required=True, help="Base model: a local folder or a Hub id org/name[@revision].")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="DIR[:LABEL]",
    help="A PEFT LoRA folder evaluated as base + adapter (repeatable). LABEL (default: the folder name) "
    "names the variant; adapters given the same label are summed into one variant. The label "
    "'before' marks the reference (base + utility adapters) that derived metrics compare against "
    "(else the base model); 'safety' marks the safety adapter (its over-refusal caps the recommendation); "
    "any other label is a candidate for the recommendation.",
)
@evaluation_options(required=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Model weights dtype (auto: bfloat16 on GPU, float32 on CPU).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write metrics.json.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the safety/utility PNG (default: --out with the suffix .png).",
)
def evaluate(
    base_model: str, adapters: tuple[str, ...], device: str, dtype: str, out: str, plot: str | None, **options
) -> None:
    """Evaluate the base model and base + each adapter: safety (refusals on harmful prompts), over-refusal
    (refusals on benign prompts) and utility, with 95% intervals; writes metrics.json and a plot."""
    from rich.console import Console

    from ..evaluation.judges import make_judge
    from ..evaluation.runner import EvaluationData, evaluate_variants, write_outputs
    from ..modeling import load_base_model, resolve_device

    spec = evaluation_spec(options)
    variants = build_variants(adapters)
    data = EvaluationData.load(spec)
    refusal_judge = make_judge(spec.judge, device=str(resolve_device(device)))
    model, tokenizer = load_base_model(base_model, device, dtype)
    with progress_bar() as report:
        metrics = evaluate_variants(model, tokenizer, variants, spec, report, data=data, judge=refusal_judge)
    png = Path(plot) if plot else Path(out).with_suffix(".png")
    write_outputs(metrics, out, png)
    console = Console()
    console.print(metrics_table(metrics))
    console.print(f"wrote {out} and {png}")
