"""Safety/utility evaluation of a base model and its adapter variants (SPEC §5).

Modules, in the order data flows through them:

- `judges`: is a completion a refusal? (`keyword`, `classifier:<model>`)
- `generation`: batched greedy completions and reference-response NLL
- `metrics`: utility scores (`exact_match`, `contains`, `rouge_l`, `nll`)
- `stats`: rates with 95% Wilson intervals
- `derived`: safety gain, utility drop, safety/refusal tax, Pareto flags, recommended α
- `plot`: the safety-vs-utility and over-refusal-vs-safety PNG
- `runner`: `evaluate_variants` / `run_evaluation`, which produce `metrics.json` (layout in README.md)

Only `judges`, `generation` and `runner` import torch; import the others freely from torch-free code.
"""
