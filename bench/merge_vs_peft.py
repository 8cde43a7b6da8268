"""Merge step vs PEFT's `add_weighted_adapter` on the same adapters, side by side in one run.

Two r=16 adapters (utility, safety) on all 7 projection types of SmolLM2-135M-Instruct (210 modules).
Timed, each including writing the merged adapter to disk:
  sst (soft / topk) — from Fisher factors already in memory (what a cached sweep point costs):
                       GEVP + projection + concatenated-LoRA factors + save,
  linear, ties, dare_linear, dare_ties, magnitude_prune — dense per-module rule + SVD + save,
  PEFT add_weighted_adapter with combination_type svd, ties_svd, linear — + save_pretrained.
Prints the median over repeats and each method's time ÷ each PEFT time.

    .venv/bin/python -m bench.merge_vs_peft --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.testbed.assets import smollm2_folder
from sstmerge_core.adapters import load_adapter, save_adapter
from sstmerge_core.merge import WeightedAdapter, merge_modules, module_inputs, span_bases
from sstmerge_core.methods.base import FisherFactors
from sstmerge_core.methods.catalog import parse_params
from sstmerge_core.methods.registry import get_method
from sstmerge_core.tiny import random_lora

OURS = {
    "sst (soft)": ("sst", {"selection": "soft"}),
    "sst (topk)": ("sst", {"selection": "topk", "k": 16}),
    "linear": ("linear", {}),
    "ties": ("ties", {}),
    "dare_linear": ("dare_linear", {}),
    "dare_ties": ("dare_ties", {}),
    "magnitude_prune": ("magnitude_prune", {}),
}
PEFT = {"peft svd": "svd", "peft ties_svd": "ties_svd", "peft linear": "linear"}


def random_factors(bases: dict, seed: int = 0) -> dict[str, FisherFactors]:
    """Positive-definite r×r factors in place of a data pass (the merge step's cost does not depend on them)."""
    g = torch.Generator().manual_seed(seed)

    def spd(n: int) -> torch.Tensor:
        X = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
        return X @ X.T

    return {
        n: FisherFactors(R_in, R_out, spd(R_in.shape[1]), spd(R_out.shape[1]), spd(R_in.shape[1]), spd(R_out.shape[1]))
        for n, (R_in, R_out) in bases.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = smollm2_folder()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        u_dir = random_lora(base, tmp / "u", seed=1, r=16, lora_alpha=32)
        s_dir = random_lora(base, tmp / "s", seed=2, r=16, lora_alpha=32)
        inputs = module_inputs([WeightedAdapter(load_adapter(u_dir))], [WeightedAdapter(load_adapter(s_dir))])
        fisher = random_factors(span_bases(inputs))
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), u_dir, adapter_name="u")
        peft_model.load_adapter(s_dir, adapter_name="s")

        def ours(method: str, extra: dict, out: Path) -> None:
            params = parse_params(method, {"alphas": [1.0], **extra})
            results = merge_modules(get_method(method), inputs, params, fisher if method == "sst" else None)[1.0]
            save_adapter(out, {n: r.factors for n, r in results.items() if r.factors is not None}, base_model=str(base))

        def peft(kind: str, out: Path) -> None:
            extra = {"density": 0.5} if kind == "ties_svd" else {}
            peft_model.add_weighted_adapter(["u", "s"], [1.0, 1.0], "m", combination_type=kind, **extra)
            peft_model.save_pretrained(out, selected_adapters=["m"])
            peft_model.delete_adapter("m")

        runs: dict[str, list[float]] = {name: [] for name in [*OURS, *PEFT]}
        for repeat in range(args.repeats):
            for name, (method, extra) in OURS.items():
                start = time.perf_counter()
                ours(method, extra, tmp / f"{name}-{repeat}")
                runs[name].append(time.perf_counter() - start)
            for name, kind in PEFT.items():
                start = time.perf_counter()
                peft(kind, tmp / f"{kind}-{repeat}")
                runs[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(v) for name, v in runs.items()}
    print(
        f"SmolLM2-135M-Instruct, {len(inputs)} modules, two r=16 adapters, {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads; times include saving the adapter"
    )
    header = f"{'method':<18}{'median s':>10}" + "".join(f"{'÷ ' + p:>18}" for p in PEFT)
    print(header)
    for name in [*OURS, *PEFT]:
        ratios = "".join(f"{medians[name] / medians[p]:>18.2f}" for p in PEFT)
        print(f"{name:<18}{medians[name]:>10.2f}{ratios}")


if __name__ == "__main__":
    main()
