"""Safety/utility evaluation of a base model and its adapter variants (layout of metrics.json in README.md).

Modules, in the order data flows through them:

- `judges`: is a completion a refusal? (the registry `JUDGES`: `keyword`, `classifier:<model>` in `classifier`, …)
- `batching`: how many prompts fit one batch (the memory model behind batch size "auto")
- `generation`: batched greedy completions and reference-response NLL
- `metrics`: utility scores (the registry `UTILITY_METRICS`: `exact_match`, `contains`, `rouge_l`, `nll`, …)
- `stats`: rates with 95% Wilson intervals
- `outcomes`: per-prompt outcomes of a model, and its rates on any subset of the prompts
- `splits`: the search/report split of every evaluation set
- `bootstrap`: paired bootstrap of the difference between two models on the same prompts
- `derived`: safety gain, utility drop, safety/refusal tax, Pareto flags
- `recommend`: the model to ship, chosen on the search split by a rule bounding both prices of safety
- `plot`: the safety-vs-utility and safety-vs-over-refusal PNG
- `runner`: `evaluate_variants` / `run_evaluation`, which produce `metrics.json`

Only `classifier`, `batching`, `generation` and `runner` import torch; import the others freely from torch-free
code (`bootstrap` and `plot` need numpy and matplotlib).
"""
