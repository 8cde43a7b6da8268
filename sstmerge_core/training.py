"""Small, seeded LoRA fine-tuning with PEFT (no `Trainer`): for making test and testbed adapters.

The loss is the mean token log-loss over response tokens only (prompt and padding are masked), on
right-padded batches built with `prompting.encode`, optimised with AdamW under a linear warm-up/decay
schedule. For a fixed seed, data order, LoRA initialisation and dropout are reproducible, so two runs
on the same device give identical adapters.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import Example
from .errors import DatasetError, InputError
from .modeling import ModelRef, is_conv1d, linear_module_names, load_base_model
from .prompting import Encoded, encode

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
WARMUP_FRACTION = 0.05
MAX_GRAD_NORM = 1.0


def _in_layer_list(name: str) -> bool:
    """True if a dotted module name has a numeric component, i.e. lies inside a list of (decoder) layers."""
    return any(part.isdigit() for part in name.split("."))


def decoder_projection_names(model: PreTrainedModel) -> list[str]:
    """Short names of the Linear/Conv1D modules inside the decoder layers, in order of first appearance.

    A module is inside a decoder layer when its dotted name has a numeric component (an index into the
    layer list: `model.layers.3.self_attn.q_proj`, `transformer.h.0.attn.c_attn`); the output head and
    any projection outside the layers are left out.
    """
    short: dict[str, None] = {}
    for name in linear_module_names(model):
        if _in_layer_list(name):
            short.setdefault(name.rsplit(".", 1)[-1], None)
    return list(short)


def resolve_target_modules(model: PreTrainedModel, target_modules: list[str] | None) -> tuple[list[str], bool]:
    """(target module names, fan_in_fan_out) for a LoRA on `model`.

    `None` means every decoder projection (detected). Each given name must match, as a full dotted name
    or as its last components, at least one Linear/Conv1D module; `fan_in_fan_out` is True for GPT-2
    style Conv1D targets. Targets mixing Linear and Conv1D modules are refused.
    """
    candidates = linear_module_names(model)
    targets = decoder_projection_names(model) if target_modules is None else list(target_modules)
    if not targets:
        raise InputError(f"no Linear projection modules found inside the decoder layers of {type(model).__name__}")
    matched: list[str] = []
    for target in targets:
        hits = [name for name in candidates if name == target or name.endswith("." + target)]
        if not hits:
            available = ", ".join(decoder_projection_names(model))
            raise InputError(f"target module {target!r} matches no Linear module of the model (available: {available})")
        matched += hits
    kinds = {is_conv1d(model.get_submodule(name)) for name in matched}
    if len(kinds) > 1:
        raise InputError(f"target modules {targets} mix Linear and Conv1D modules; train them separately")
    return targets, kinds.pop()


def encode_examples(tokenizer, examples: list[Example], max_length: int) -> list[Encoded]:
    """Encode prompt+response pairs; every example must have a non-empty response (the scored tokens)."""
    if not examples:
        raise DatasetError("no training examples")
    missing = [i for i, ex in enumerate(examples, start=1) if not (ex.response and ex.response.strip())]
    if missing:
        raise DatasetError(f"training needs a response for every example; row {missing[0]} has none")
    return [encode(tokenizer, ex.prompt, ex.response, max_length) for ex in examples]


def collate(batch: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors (B × T): `input_ids`, `attention_mask`, and `labels` = ids on response
    tokens, IGNORE_INDEX on prompt and padding."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, item.response_start : len(ids)] = ids[item.response_start :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token log-loss over the batch's response tokens (a scalar)."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def mean_response_loss(
    model: nn.Module, tokenizer, examples: list[Example], *, max_length: int = 256, batch_size: int = 8
) -> float:
    """Token-weighted mean response log-loss of `examples` under `model` (evaluation mode)."""
    encoded = encode_examples(tokenizer, examples, max_length)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(response_loss(model, batch)) * count
        tokens += count
    model.train(was_training)
    return total / tokens


def linear_schedule(total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over the first WARMUP_FRACTION of steps, then linear decay to 0."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _batches(encoded: list[Encoded], batch_size: int, rng: random.Random) -> list[list[Encoded]]:
    """One epoch of shuffled batches (the last one may be smaller)."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    return [[encoded[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train-lora", unit="step", disable=not enabled, dynamic_ncols=True)


def _check_hyperparameters(r: int, lora_alpha: float, epochs: int, lr: float, batch_size: int, max_length: int) -> None:
    for name, value in {"r": r, "epochs": epochs, "batch_size": batch_size}.items():
        if value < 1:
            raise InputError(f"{name} must be ≥ 1 (got {value})")
    if lora_alpha <= 0 or lr <= 0:
        raise InputError(f"lora_alpha and lr must be > 0 (got {lora_alpha}, {lr})")
    if max_length < 2:
        raise InputError(f"max_length must be ≥ 2 (got {max_length})")


def train_lora(
    base: str,
    examples: list[Example],
    out_dir: str | Path,
    *,
    r: int = 16,
    lora_alpha: float = 32,
    target_modules: list[str] | None = None,
    epochs: int = 1,
    lr: float = 2e-4,
    batch_size: int = 8,
    max_length: int = 256,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> Path:
    """Fine-tune a LoRA of rank `r` on `base` (folder or Hub id) and save it as a PEFT folder at `out_dir`.

    `target_modules=None` targets every Linear projection inside the decoder layers (detected). The
    saved `adapter_config.json` names the base model (resolved local path, or Hub id + revision).
    """
    from peft import LoraConfig, get_peft_model

    _check_hyperparameters(r, lora_alpha, epochs, lr, batch_size, max_length)
    ref = ModelRef.parse(base)
    model, tokenizer = load_base_model(ref, device=device, dtype=dtype)
    encoded = encode_examples(tokenizer, examples, max_length)
    targets, fan_in_fan_out = resolve_target_modules(model, target_modules)

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float scales (α/r) the same
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, revision=ref.revision)
    peft_model.peft_config["default"].base_model_name_or_path = ref.name_or_path
    peft_model.train()
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(epochs * steps_per_epoch))
    log.info(
        "training LoRA r=%d on %d examples, targets %s, %d steps", r, len(encoded), targets, epochs * steps_per_epoch
    )

    rng = random.Random(seed)
    with _progress(epochs * steps_per_epoch, progress) as bar:
        for epoch in range(epochs):
            epoch_loss = 0.0
            for batch in _batches(encoded, batch_size, rng):
                loss = response_loss(peft_model, collate(batch, tokenizer.pad_token_id))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                epoch_loss += loss.item()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            log.info("epoch %d/%d: mean response loss %.4f", epoch + 1, epochs, epoch_loss / steps_per_epoch)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
