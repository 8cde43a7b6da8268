"""Base-model plumbing: loading (local folder or Hub id, no remote code), finding LoRA target modules,
and adding dense updates ΔW to their weights in place (and taking them out again)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .adapters import LoraFactors
from .errors import AdapterError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A base model: a local folder, or a Hub id with an optional revision (`org/name@rev`)."""

    name_or_path: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if Path(text).exists():
            return cls(str(Path(text).resolve()))
        name, _, revision = text.partition("@")
        return cls(name, revision or None)

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).is_dir()

    def __str__(self) -> str:
        return self.name_or_path + (f"@{self.revision}" if self.revision else "")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)") from None


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.name_or_path, revision=ref.revision, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(ref: ModelRef | str, device: str = "auto", dtype: str = "auto"):
    """Load (model, tokenizer) with transformers; safetensors weights only, `trust_remote_code=False`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress reporting covers loading
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref.name_or_path,
            revision=ref.revision,
            dtype=torch_dtype,
            trust_remote_code=False,
            use_safetensors=True,
        )
        tokenizer = load_tokenizer(ref)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load base model {ref}: {first_line}") from exc
    model.to(torch_device).eval()  # type: ignore[arg-type]  # transformers wraps `to`; mypy misreads its self
    log.info(
        "loaded base model",
        extra={
            "model": str(ref),
            "device": str(torch_device),
            "dtype": str(torch_dtype),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    )
    return model, tokenizer


def num_layers(model: PreTrainedModel) -> int:
    """L, the number of decoder layers (from the config)."""
    for key in ("num_hidden_layers", "n_layer"):
        value = getattr(model.config, key, None)
        if isinstance(value, int):
            return value
    raise ModelError(f"cannot tell the number of layers of {type(model).__name__}")


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear, Conv1D or embedding module (`nn.Module` types any attribute as Tensor | Module)."""
    return cast(torch.Tensor, module.weight)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: weight stored (d_in × d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv1D module."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        d_in, d_out = weight_of(module).shape
        return int(d_out), int(d_in)
    raise AdapterError(f"{type(module).__name__} is not a Linear or Conv1D module")


def update_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a module's update ΔW: Linear/Conv1D as `linear_shape`, an embedding (d, V) — as in PEFT,
    whose embedding LoRA adds (s·B A)ᵀ to the (V × d) table."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    return linear_shape(module)


def get_target_module(
    model: PreTrainedModel, name: str, shape: tuple[int, ...] | None = None, *, allow_embedding: bool = False
) -> nn.Module:
    """The module called `name`, checked to be Linear/Conv1D (or, with `allow_embedding`, an embedding) and, if
    given, of ΔW shape (d_out, d_in)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"module {name}: not found in the base model ({type(model).__name__})") from None
    try:
        actual = update_shape(module) if allow_embedding else linear_shape(module)
    except AdapterError as exc:
        raise AdapterError(f"module {name}: {exc}") from None
    if shape is not None and tuple(shape) != actual:
        raise AdapterError(
            f"module {name}: adapter update has shape {tuple(shape)} (d_out, d_in) but the base model's "
            f"module is {actual}; the adapter was trained for another base model"
        )
    return module


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Names of every Linear/Conv1D module below the decoder (the output head excluded)."""
    head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and module is not head
    ]


def dense_update(update: torch.Tensor | LoraFactors, device: torch.device) -> torch.Tensor:
    """ΔW (d_out × d_in) on `device`: the tensor itself, or s·B A formed there (in float32 or wider)."""
    if isinstance(update, LoraFactors):
        return LoraFactors(update.B.to(device), update.A.to(device), update.scale).delta()
    return update.to(device)


@torch.no_grad()
def add_delta(module: nn.Module, delta: torch.Tensor) -> None:
    """W ← W + ΔW for ΔW in (d_out × d_in) orientation (W's dtype; the sum is formed in float32)."""
    weight = weight_of(module)
    update = delta.T if is_conv1d(module) or isinstance(module, nn.Embedding) else delta
    weight.copy_((weight.float() + update.to(device=weight.device, dtype=torch.float32)).to(weight.dtype))


def _shares_weight(model: PreTrainedModel, module: nn.Module) -> bool:
    """True when `module`'s weight is also another module's (an input embedding tied to the output head)."""
    return any(other is not module and getattr(other, "weight", None) is module.weight for other in model.modules())


@contextlib.contextmanager
def merged_deltas(model: PreTrainedModel, deltas: Mapping[str, torch.Tensor | LoraFactors]) -> Iterator[nn.Module]:
    """Temporarily W_m ← W_m + ΔW_m for every m; the original weights are restored bit-exactly.

    Updates may be dense tensors or LoRA factors (formed one module at a time on the module's device, so
    no dense copy of every ΔW is ever held). Originals of GPU weights are kept in CPU memory. An embedding whose
    table is tied to the output head gets an untied copy for the duration (as PEFT's embedding LoRA changes
    only the input lookup), and its shared table is put back afterwards.
    """
    saved: dict[str, torch.Tensor] = {}
    untied: dict[str, torch.Tensor] = {}
    try:
        for name, update in deltas.items():
            shape = update.shape if isinstance(update, LoraFactors) else tuple(update.shape)
            module = get_target_module(model, name, tuple(shape), allow_embedding=True)
            if isinstance(module, nn.Embedding) and _shares_weight(model, module):
                untied[name] = weight_of(module)
                module.weight = nn.Parameter(weight_of(module).detach().clone(), requires_grad=False)
            else:
                saved[name] = weight_of(module).detach().to("cpu", copy=True)
            add_delta(module, dense_update(update, weight_of(module).device))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                weight_of(model.get_submodule(name)).copy_(weight)
            for name, parameter in untied.items():
                model.get_submodule(name).weight = parameter


def _lora_branch(module: nn.Module, update: torch.Tensor | LoraFactors):
    """The hook adding ΔW x to `module`'s output: (x Aᵀ)(s·B)ᵀ for LoRA factors, x ΔWᵀ for a dense ΔW; an embedding
    adds row t of ΔWᵀ for token t. Factors already in the module's dtype and device (and scale 1, as concatenated
    factors are) are used as they are, without a copy."""
    weight = weight_of(module)
    embedding = isinstance(module, nn.Embedding)
    if isinstance(update, LoraFactors):
        down = update.A.to(weight.device, weight.dtype)  # r × d_in
        up = update.B if update.scale == 1 else update.scale * update.B.double()
        up = up.to(weight.device, weight.dtype)  # d_out × r
        if embedding:
            down = down.T.contiguous()  # V × r, a lookup table
    else:
        down, up = update.to(weight.device, weight.dtype), None  # d_out × d_in
        if embedding:
            down = down.T.contiguous()

    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if embedding:
            h = nn.functional.embedding(x, down)
            return output + (h if up is None else nn.functional.linear(h, up)).to(output.dtype)
        h = nn.functional.linear(x.to(down.dtype), down)
        return output + (h if up is None else nn.functional.linear(h, up)).to(output.dtype)

    return hook


@contextlib.contextmanager
def lora_forward(model: PreTrainedModel, deltas: Mapping[str, torch.Tensor | LoraFactors]) -> Iterator[nn.Module]:
    """Temporarily y_m = W_m x + ΔW_m x for every m, by forward hooks (as PEFT runs an unmerged adapter).

    The weights are never touched, so nothing is copied and nothing needs restoring: memory grows only by the
    factors (cast to the module's dtype), where `merged_deltas` keeps a copy of every updated weight.
    """
    handles = []
    try:
        for name, update in deltas.items():
            shape = update.shape if isinstance(update, LoraFactors) else tuple(update.shape)
            module = get_target_module(model, name, tuple(shape), allow_embedding=True)
            handles.append(module.register_forward_hook(_lora_branch(module, update)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
