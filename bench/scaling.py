"""How SST-Merge's three stages grow with hidden size, LoRA rank, number of modules, depth and samples.

Tiny Llama models built from configs (no download) and random PEFT LoRA adapters on all 7 projection
types. For every setting, measured side by side in one process and interleaved over repetitions:
  fisher      — `collect_factors` (empirical labels) with every module of the setting hooked,
  model       — the same pass with no module hooked (forward + activation backward only),
  fisher÷model — their ratio, paired per repetition: 1 + hooks/model (masking, R_inᵀx, R_outᵀδ, r×r sums),
  hook math   — that arithmetic alone on random activations of the same shapes (N·M·d·r),
  gevp        — `eigenbasis` (damping + two generalized eigenproblems) of every module,
  projection  — the rest of `project`: core R_outᵀΔS R_in, coefficients, selection, exact refactorisation.
Each table varies one factor with the others fixed, and gives the median time, the ratio to the smallest
setting (median over repetitions of the paired ratio, [min–max]) and a log-log slope. Within a repetition each
pass is run `--inner` times (alternating which goes first) and the fastest kept: other load on a shared
machine only ever adds time. Expected:
model O(N·L·d²), hooks O(N·M·d·r), gevp O(M·r³), projection O(M·d·r²) (N scored tokens, L layers, M modules).
On a CPU only ratios and slopes are meaningful (machines are noisy); absolute times are for reference.

    .venv/bin/python -m bench.scaling            # all factors, 5 repeats (about 3 minutes on 2 cores)
    .venv/bin/python -m bench.scaling --quick    # fewer settings, 2 repeats (about a minute)
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sstmerge_core.adapters import load_adapter
from sstmerge_core.data import Example
from sstmerge_core.fisher import FisherConfig, accumulate_outer, collect_factors, encode_examples
from sstmerge_core.gevp import eigenbasis, factorize
from sstmerge_core.merge import WeightedAdapter, module_inputs, span_bases
from sstmerge_core.methods.catalog import SSTParams
from sstmerge_core.methods.sst import selection_weights
from sstmerge_core.modeling import load_base_model
from sstmerge_core.tiny import build_tiny_model, random_lora

TERMS = ("fisher", "model", "hook_math", "gevp", "projection")
LABELS = {
    "fisher": "fisher",
    "model": "model f/b",
    "hook_math": "hook math",
    "gevp": "gevp",
    "projection": "projection",
}
EXPECTED = {
    "fisher": "model + hooks",
    "model": "N·L·d²",
    "hook_math": "N·M·d·r",
    "gevp": "M·r³",
    "projection": "M·d·r²",
}
SHARES = ("model", "hooks", "gevp", "projection")


@dataclass(frozen=True)
class Setting:
    hidden: int = 256
    layers: int = 2
    rank: int = 16
    hooked_layers: int | None = None  # hook the modules of the first k layers only (None: all)
    samples: int = 32

    @property
    def model_key(self) -> tuple[int, int]:
        return self.hidden, self.layers


def factor_grid(quick: bool) -> dict[str, tuple[str, list[Setting]]]:
    """Per factor: (the value's name, the settings), every other factor at the default."""
    if quick:
        return {
            "hidden": ("d", [Setting(hidden=h) for h in (128, 256, 512)]),
            "rank": ("r", [Setting(rank=r) for r in (4, 16, 64)]),
            "modules": ("M", [Setting(layers=8, hooked_layers=k if k < 8 else None) for k in (1, 4, 8)]),
            "samples": ("n", [Setting(samples=n) for n in (16, 64)]),
        }
    return {
        "hidden": ("d", [Setting(hidden=h) for h in (128, 256, 512)]),
        "rank": ("r", [Setting(rank=r) for r in (4, 8, 16, 32, 64)]),
        "modules": ("M", [Setting(layers=8, hooked_layers=k if k < 8 else None) for k in (1, 2, 4, 8)]),
        "layers": ("L", [Setting(layers=n) for n in (2, 4, 8)]),
        "samples": ("n", [Setting(samples=n) for n in (16, 32, 64)]),
    }


def factor_value(factor: str, s: Setting, modules: int) -> int:
    return {"hidden": s.hidden, "rank": s.rank, "modules": modules, "layers": s.layers, "samples": s.samples}[factor]


def make_examples(n: int) -> list[Example]:
    """Prompt/response pairs of equal token length (the tiny tokenizer; content does not matter for timing)."""
    words = ["bread", "soup", "tea", "rice", "salad", "water", "light", "sugar"]
    return [
        Example(
            f"How do I make {words[i % len(words)]} at home? Explain it.",
            " ".join(words[(i + j) % len(words)] for j in range(16)),
        )
        for i in range(n)
    ]


def per_call(fn, min_seconds: float) -> float:
    """Mean seconds per call of a cheap `fn`, repeating it for at least `min_seconds`."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


class Case:
    """One setting: its model, hooked modules, bases and examples; Fisher factors from the first pass."""

    def __init__(self, setting: Setting, model, tokenizer, adapter, config: FisherConfig) -> None:
        self.setting, self.model, self.tokenizer, self.config = setting, model, tokenizer, config
        inputs = module_inputs([], [WeightedAdapter(adapter)], model)
        if setting.hooked_layers is not None:
            inputs = {n: m for n, m in inputs.items() if int(n.split(".")[2]) < setting.hooked_layers}
        self.inputs = inputs
        self.bases = span_bases(inputs)
        self.examples = make_examples(setting.samples)
        items = encode_examples(model, tokenizer, self.examples, config)
        self.tokens = sum(len(e.input_ids) - e.response_start for e in items)  # scored positions N
        self.factors = None
        g = torch.Generator().manual_seed(0)
        self.activations = {  # random x (N × d_in), δ (N × d_out) of each hooked module, for the hook math
            name: (torch.randn(self.tokens, m.shape[1], generator=g), torch.randn(self.tokens, m.shape[0], generator=g))
            for name, m in inputs.items()
        }

    @property
    def modules(self) -> int:
        return len(self.bases)

    def fisher(self) -> float:
        start = time.perf_counter()
        factors = collect_factors(self.model, self.tokenizer, self.examples, self.bases, self.config)
        elapsed = time.perf_counter() - start
        self.factors = self.factors or factors
        return elapsed

    def model_pass(self) -> float:
        start = time.perf_counter()
        collect_factors(self.model, self.tokenizer, self.examples, {}, self.config)
        return time.perf_counter() - start

    def hook_math(self) -> None:
        for name, (R_in, R_out) in self.bases.items():
            x, delta = self.activations[name]
            r_in, r_out = R_in.float(), R_out.float()
            accumulate_outer(torch.zeros(r_in.shape[1], r_in.shape[1], dtype=torch.float64), x @ r_in)
            accumulate_outer(torch.zeros(r_out.shape[1], r_out.shape[1], dtype=torch.float64), delta @ r_out)

    def _basis(self, name: str, params: SSTParams):
        R_in, R_out = self.bases[name]
        f, (A_s, G_s) = self.factors[name], self.other[name]
        return eigenbasis(R_out, R_in, f.A, f.G, A_s, G_s, params.damping)

    def gevp(self, params: SSTParams) -> None:
        for name in self.bases:
            self._basis(name, params)

    def prepare_projection(self, params: SSTParams) -> None:
        """Solve each module once for the projection timings; the other side's factors are random SPD
        matrices of the same size (the timing of a GEVP does not depend on which data produced it)."""
        g = torch.Generator().manual_seed(1)

        def spd(k: int) -> torch.Tensor:
            w = torch.randn(k, 2 * k, generator=g, dtype=torch.float64)
            return w @ w.T / (2 * k)

        self.other = {name: (spd(f.A.shape[0]), spd(f.G.shape[0])) for name, f in self.factors.items()}
        self._bases_solved = {name: self._basis(name, params) for name in self.bases}

    def projection(self, params: SSTParams) -> None:
        for name, basis in self._bases_solved.items():
            C = basis.coefficients(self.inputs[name].safety.core(basis.R_out, basis.R_in))
            W = selection_weights(basis, params)
            left, right = basis.left_right()
            factorize(left, C * W, right)


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def fmt_time(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds >= 0.1 else f"{seconds * 1e3:.2f}ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings and 2 repeats (about a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions (default 5, 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on a shared machine; the ratios are what matter)",
    )
    parser.add_argument(
        "--inner",
        type=int,
        default=None,
        help="Fisher and model passes per repetition, the fastest kept (default 2, 1 with --quick)",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.05,
        help="cheap terms (hook math, gevp, projection) are repeated for at least this long per sample",
    )
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    inner = args.inner or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)  # collect_factors logs every pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    grid = factor_grid(args.quick)
    settings = sorted(
        {s for _, group in grid.values() for s in group},
        key=lambda s: (s.hidden, s.layers, s.rank, s.hooked_layers or 0, s.samples),
    )
    config = FisherConfig(estimator="empirical", batch_size=args.batch_size, max_length=128)
    params = SSTParams(selection="soft")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models, adapters, cases = {}, {}, {}
        for s in settings:
            if s.model_key not in models:
                folder = build_tiny_model(
                    "llama", root / f"llama-{s.hidden}-{s.layers}", hidden=s.hidden, layers=s.layers
                )
                models[s.model_key] = (folder, *load_base_model(str(folder), device="cpu", dtype="float32"))
            folder, model, tokenizer = models[s.model_key]
            if (s.model_key, s.rank) not in adapters:
                path = random_lora(
                    folder, root / f"lora-{s.hidden}-{s.layers}-{s.rank}", seed=1, r=s.rank, lora_alpha=2 * s.rank
                )
                adapters[s.model_key, s.rank] = load_adapter(path)
            cases[s] = Case(s, model, tokenizer, adapters[s.model_key, s.rank], config)
        build_s = time.perf_counter() - started

        for case in cases.values():  # warm-up, and the factors the GEVP/projection run on
            case.fisher()
            case.model_pass()
            case.prepare_projection(params)
        runs = {s: {t: [] for t in (*TERMS, "overhead")} for s in settings}
        for rep in range(repeats):
            order = settings[rep % len(settings) :] + settings[: rep % len(settings)]  # rotate: interleaved
            for s in order:
                case, r = cases[s], runs[s]
                fs, ms = [], []
                for i in range(inner):  # alternate which pass goes first, so neither always runs on a warmer cache
                    if (rep + i) % 2:
                        ms.append(case.model_pass())
                        fs.append(case.fisher())
                    else:
                        fs.append(case.fisher())
                        ms.append(case.model_pass())
                r["fisher"].append(min(fs))
                r["model"].append(min(ms))
                r["overhead"].append(min(fs) / min(ms))
                r["hook_math"].append(per_call(case.hook_math, args.min_seconds))
                r["gevp"].append(per_call(lambda c=case: c.gevp(params), args.min_seconds))
                r["projection"].append(per_call(lambda c=case: c.projection(params), args.min_seconds))
        measure_s = time.perf_counter() - started - build_s

    print(
        f"tiny Llama (vocab {len(models[settings[0].model_key][2])}, MLP 2d+8, 4 heads / 2 KV heads), random LoRA on "
        f"all 7 projections; defaults d=256, L=2, r=16, M=all 7·L, n=32 samples; batch {args.batch_size}, "
        f"{args.threads} thread(s), {repeats} repeats (interleaved) × {inner} inner (fastest kept); "
        f"build {build_s:.0f}s, measure {measure_s:.0f}s"
    )
    print(
        "cells: median time, ×ratio to the first row (median of per-repetition ratios) [min–max]; "
        "fisher÷model: median [min–max] of the per-repetition ratio"
    )
    dominance = []
    for factor, (symbol, group) in grid.items():
        print()
        values = [factor_value(factor, s, cases[s].modules) for s in group]
        fixed = {
            "hidden": "L=2 r=16 n=32",
            "rank": "d=256 L=2 n=32",
            "modules": "d=256 L=8 r=16 n=32 (model fixed)",
            "layers": "d=256 r=16 n=32 (M=7·L)",
            "samples": "d=256 L=2 r=16",
        }[factor]
        print(f"== {factor}: {symbol} = {', '.join(map(str, values))}   [{fixed}]")
        header = (
            f"{symbol:>4} {'M':>3} {'N tok':>6} "
            + "".join(f"{LABELS[t]:>27}" for t in TERMS[:2])
            + f"{'fisher÷model':>19}"
            + "".join(f"{LABELS[t]:>27}" for t in TERMS[2:])
        )
        print(header)
        first = runs[group[0]]
        for s, v in zip(group, values):
            r = runs[s]
            cells = []
            for t in TERMS:
                ratios = [a / b for a, b in zip(r[t], first[t]) if b > 0]
                ratio = statistics.median(ratios) if ratios else float("nan")
                spread = f"[{min(ratios):.2f}–{max(ratios):.2f}]" if ratios else ""
                cells.append(f"{fmt_time(statistics.median(r[t])):>9} ×{ratio:<5.2f}{spread:>12}")
            o = r["overhead"]
            overhead = f"{statistics.median(o):.2f} [{min(o):.2f}–{max(o):.2f}]"
            print(
                f"{v:>4} {cases[s].modules:>3} {cases[s].tokens:>6} "
                + "".join(f"{c:>27}" for c in cells[:2])
                + f"{overhead:>19}"
                + "".join(f"{c:>27}" for c in cells[2:])
            )
        slopes = []
        for t in TERMS:
            slope = fit_slope(values, [statistics.median(runs[s][t]) for s in group])
            slopes.append(f"{LABELS[t]} {slope:.2f}")
        print(f"log-log slope vs {symbol}: " + ", ".join(slopes))
        shares = []
        for s in group:
            med = {t: statistics.median(runs[s][t]) for t in TERMS}
            hooks = med["fisher"] * max(0.0, 1 - 1 / statistics.median(runs[s]["overhead"]))
            total = med["fisher"] + med["gevp"] + med["projection"]
            shares.append(
                {
                    "model": (med["fisher"] - hooks) / total,
                    "hooks": hooks / total,
                    "gevp": med["gevp"] / total,
                    "projection": med["projection"] / total,
                }
            )
        dominance.extend(shares)
        share_text = ", ".join(f"{k} {min(x[k] for x in shares):.1%}–{max(x[k] for x in shares):.1%}" for k in SHARES)
        top = max(SHARES, key=lambda k: statistics.median(x[k] for x in shares))
        print(f"share of fisher+gevp+projection (hooks = fisher·(1 − model/fisher)): {share_text} → dominant: {top}")
    print()
    terms = SHARES
    top = max(terms, key=lambda k: statistics.median(x[k] for x in dominance))
    print("expected growth: " + ", ".join(f"{LABELS[t]} ~ {EXPECTED[t]}" for t in TERMS))
    print(
        f"overall: {top} dominates in {sum(max(terms, key=x.get) == top for x in dominance)}/{len(dominance)} "
        f"settings; median shares " + ", ".join(f"{k} {statistics.median(x[k] for x in dominance):.1%}" for k in terms)
    )


if __name__ == "__main__":
    main()
