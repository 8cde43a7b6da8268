"""SST-Merge at Llama-3.1-8B scale on one GPU, with random weights (nothing is downloaded).

Builds a Llama model with the Llama-3.1-8B shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads,
vocab 128256; all 32 layers by default, or `--layers N`), two r=16 LoRA adapters (utility, safety) on all
7 projection types, and measures, for `--samples` utility + `--samples` safety sequences of `--seq-len`
tokens:
  - the Fisher passes (tokens/s; sampled labels on utility data, empirical on safety data),
  - the GEVP + projection of every module (seconds; SST soft and top-k),
  - peak GPU memory.
Memory stays bounded: ΔU is added one module at a time from its factors (originals kept in CPU memory),
hooks keep only r×r sums, and `--layer-group` can split the layers over several passes.

    python -m bench.gpu_8b                         # the full report on a GPU (a few minutes on an H100/H200)
    python -m bench.gpu_8b --layers 2 --hidden 256 --mlp 512 --heads 4 --kv-heads 2 --vocab 1024 \
        --samples 8 --seq-len 32 --device cpu      # smoke run of the same code path on a CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sstmerge_core.adapters import LoraFactors
from sstmerge_core.fisher import SpanHooks, frozen_parameters
from sstmerge_core.gevp import orthonormal_basis
from sstmerge_core.methods.base import FisherFactors, ModuleInputs
from sstmerge_core.methods.catalog import SSTParams
from sstmerge_core.methods.sst import project
from sstmerge_core.modeling import linear_shape, merged_deltas

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(args, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Llama with the requested shapes, created directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq_len, 256),
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def random_adapter(model, rank: int, seed: int, device: torch.device) -> dict[str, LoraFactors]:
    """An r-rank LoRA on every projection, with PEFT-like magnitudes (B small but non-zero)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    adapter = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            d_out, d_in = linear_shape(module)
            A = torch.randn(rank, d_in, generator=g) / d_in**0.5
            B = torch.randn(d_out, rank, generator=g) * 1e-3
            adapter[name] = LoraFactors(B.to(device), A.to(device), 2.0)
    return adapter


def fisher_pass(model, modules, bases, ids, batch_size, sampled: bool, seed: int):
    """Restricted K-FAC factors of `modules` over `ids` (n × seq), every position scored."""
    device = ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    sub = {m: bases[m] for m in modules}
    with frozen_parameters(model), SpanHooks(model, sub) as hooks:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]
            scored = torch.ones_like(batch, dtype=torch.bool)
            scored[:, -1] = False
            hooks.mask = scored
            logits = model(input_ids=batch, logits_to_keep=torch.arange(batch.shape[1] - 1, device=device)).logits
            logits = logits.reshape(-1, logits.shape[-1]).float()
            if sampled:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
            else:
                labels = batch[:, 1:].reshape(-1)
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    return hooks.factors


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1000, help="sequences per data set (utility and safety)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--layer-group",
        type=int,
        default=0,
        help="layers hooked per data pass (0: all in one pass; hooks and factors are tiny, so "
        "grouping only trades passes for nothing unless activations of hooks matter)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    model = build_model(args, device, dtype)
    utility, safety = random_adapter(model, args.rank, 1, device), random_adapter(model, args.rank, 2, device)
    bases = {
        n: (orthonormal_basis(f.A.T).float().to(device), orthonormal_basis(f.B).float().to(device))
        for n, f in safety.items()
    }
    g = torch.Generator(device="cpu").manual_seed(0)
    data = {
        kind: torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=g).to(device)
        for kind in ("utility", "safety")
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - started

    names = sorted(safety)
    args.layer_group = args.layer_group or args.layers
    groups = [
        [n for n in names if int(n.split(".")[2]) // args.layer_group == k]
        for k in range((args.layers + args.layer_group - 1) // args.layer_group)
    ]
    factors: dict[str, dict] = {"utility": {}, "safety": {}}
    pass_s = {"utility": 0.0, "safety": 0.0}
    with merged_deltas(model, utility):
        for group in groups:
            for kind in ("utility", "safety"):
                sync(device)
                t0 = time.perf_counter()
                factors[kind].update(
                    fisher_pass(model, group, bases, data[kind], args.batch_size, sampled=kind == "utility", seed=0)
                )
                sync(device)
                pass_s[kind] += time.perf_counter() - t0
    tokens = args.samples * (args.seq_len - 1)

    timings = {}
    for selection in ("soft", "topk"):
        params = SSTParams(selection=selection, k=10)
        sync(device)
        t0 = time.perf_counter()
        for n in names:
            u, s = factors["utility"][n], factors["safety"][n]
            R_in, R_out = bases[n]
            fisher = FisherFactors(R_in.double(), R_out.double(), u.A, u.G, s.A, s.G)
            shape = safety[n].shape
            project(ModuleInputs(n, shape, [utility[n]], safety[n].scaled(1.0), fisher), params)
        sync(device)
        timings[selection] = time.perf_counter() - t0

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "mlp", "heads", "kv_heads", "vocab", "rank")},
        "modules": len(names),
        "samples_per_set": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "layer_group": args.layer_group,
        "passes_per_set": len(groups),
        "build_s": round(build_s, 2),
        "fisher_utility_s": round(pass_s["utility"], 2),
        "fisher_safety_s": round(pass_s["safety"], 2),
        "fisher_tokens_per_s": round(2 * tokens / (pass_s["utility"] + pass_s["safety"]), 1),
        "gevp_projection_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
