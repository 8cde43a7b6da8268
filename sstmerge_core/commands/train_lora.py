"""`sstmerge train-lora`: fine-tune a small LoRA adapter on a prompt/response file (for test adapters)."""

from __future__ import annotations

import click


def _split_modules(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    """'q_proj, v_proj' → ['q_proj', 'v_proj']; None stays None (detect every decoder projection)."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("give at least one module name, e.g. q_proj,v_proj")
    return names


@click.command("train-lora")
@click.option(
    "--base", required=True, metavar="MODEL", help="Base model: a local HF folder or a Hub id (org/name[@revision])."
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Training data: JSONL or CSV with `prompt` and `response` columns (loss on the response only).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Output folder for the PEFT adapter (adapter_config.json + adapter_model.safetensors).",
)
@click.option("--r", "r", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank.")
@click.option(
    "--alpha",
    "lora_alpha",
    default=32.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="LoRA alpha (scaling = alpha / r).",
)
@click.option(
    "--target-modules",
    default=None,
    callback=_split_modules,
    metavar="NAMES",
    help="Comma-separated module names (e.g. q_proj,v_proj). Default: every Linear projection "
    "inside the decoder layers, detected from the model.",
)
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(min=1), help="Passes over the data.")
@click.option(
    "--lr",
    default=2e-4,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Peak AdamW learning rate (linear warm-up, then linear decay).",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Examples per step.")
@click.option(
    "--max-length",
    default=256,
    show_default=True,
    type=click.IntRange(min=2),
    help="Maximum tokens per example (prompt truncated from the left first).",
)
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Use only the first N rows of --data.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of LoRA initialisation and data order (same seed and device → identical adapter).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Base-model dtype (auto: bfloat16 on GPU, float32 on CPU); LoRA weights stay float32.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_lora(
    base: str,
    data_path: str,
    out_dir: str,
    r: int,
    lora_alpha: float,
    target_modules: list[str] | None,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    limit: int | None,
    seed: int,
    device: str,
    dtype: str,
    no_progress: bool,
) -> None:
    """Train a LoRA adapter on --data and save it as a PEFT folder at --out."""
    from ..data import load_examples
    from ..training import train_lora as run_training

    examples = load_examples(data_path, require_response=True, limit=limit)
    path = run_training(
        base,
        examples,
        out_dir,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        device=device,
        dtype=dtype,
        progress=not no_progress,
    )
    click.echo(f"saved LoRA adapter (r={r}, {len(examples)} examples) to {path}")
