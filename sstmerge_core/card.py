"""The model card (`README.md`) of a merged adapter, written once the job is finished: Hub front matter, the
recipe, the merge diagnostics and, when the job was evaluated, the table of every evaluated model with the
recommendation."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCardData

from .contracts.metrics import (
    Metrics,
    ModelEntry,
    NoPick,
    Numbers,
    Pick,
    PricedPick,
    PriceList,
    Rate,
    Recommended,
    Utility,
)


def front_matter(*, base_model: str, method: str) -> str:
    """YAML front matter as on the Hub: `base_model` (a Hub id or a folder name), `library_name`, `tags`."""
    data = ModelCardData(base_model=base_model, library_name="peft", tags=["lora", "merge", "sstmerge", method])
    return f"---\n{data.to_yaml()}\n---\n"


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _interval(block: Rate | Utility | None) -> str:
    """`0.850 [0.62, 0.95]` from a rate or a utility block (`0.850` without an interval), `—` without a block."""
    if block is None:
        return "—"
    text = _number(block.rate if isinstance(block, Rate) else block.value)
    if block.ci_low is not None and block.ci_high is not None:
        text += f" [{_number(block.ci_low, 2)}, {_number(block.ci_high, 2)}]"
    return text


def _rates(numbers: Numbers | ModelEntry | None) -> list[str]:
    """The safety, over-refusal and utility cells of a model or of a split's numbers."""
    if numbers is None:
        return ["—"] * 3
    return [_interval(numbers.safety), _interval(numbers.over_refusal), _interval(numbers.utility)]


def _model_name(entry: Recommended | Pick | PricedPick | None) -> str:
    """A recommended / runner-up / price-list entry: its label (and α), or none."""
    if entry is None or entry.label is None:
        return "none"
    return f"`{entry.label}`" + (f" (α = {entry.alpha:g})" if entry.alpha is not None else "")


def _tolerances(recommended: Recommended) -> str:
    return ", ".join(f"{k} ≤ {v:g}" if v is not None else f"{k}: unbounded" for k, v in recommended.tolerances)


def recommendation_lines(metrics: Metrics) -> list[str]:
    """The recommendation of `metrics.recommended`: rule, tolerances, chosen model, runner-up, reason, warning,
    near-tie notes and the price list."""
    recommended = metrics.recommended
    lines = ["**Recommendation.**", ""]
    if recommended.rule:
        lines.append(f"- rule: {recommended.rule}")
    lines.append(f"- tolerances: {_tolerances(recommended)}")
    chosen = recommended.label
    lines.append(f"- chosen: {_model_name(recommended) if chosen is not None else 'nothing qualifies'}")
    lines.append(f"- runner-up: {_model_name(recommended.runner_up)}")
    if recommended.reason:
        lines.append(f"- reason: {recommended.reason}")
    if recommended.warning:
        lines.append(f"- **{recommended.warning}**")
    lines += [f"- {note}" for note in recommended.near_tie]
    return [*lines, "", *price_table(recommended.price_list)]


def price_table(block: PriceList) -> list[str]:
    """The price list (`evaluation/pricing.py`) as a markdown table: per safety target, the merge of lowest
    over-refusal reaching it within the utility tolerance, picked on the search split, numbers of the report split."""
    split = block.reported_on
    lines = [
        f"**Price of safety** ({block.rule}; numbers of the {split} split).",
        "",
        "| safety target | merge | safety | over-refusal | utility |",
        "|---|---|---|---|---|",
    ]
    for row in block.targets:
        if isinstance(row, NoPick):
            lines.append(f"| ≥ {row.target:.2f} | none reaches it | | | |")
            continue
        cells = _rates(getattr(row, split))
        lines.append(f"| ≥ {row.target:.2f} | {_model_name(row)} | {' | '.join(cells)} |")
    return [*lines, ""]


def evaluation_lines(metrics: Metrics, this_label: str) -> list[str]:
    """The `## Evaluation` section: settings, one row per evaluated model (this adapter marked), recommendation."""
    sizes = ", ".join(f"{name} n = {block.n}" for name, block in metrics.datasets)
    lines = [
        "## Evaluation",
        "",
        f"Held-out prompts ({sizes}); judge `{metrics.judge}`, utility metric "
        f"`{metrics.utility_metric}`, greedy decoding, {metrics.max_new_tokens} new tokens, "
        "95% Wilson intervals. Over-refusal is the refusal rate on benign prompts. "
        f"Derived metrics compare with `{metrics.reference}`.",
        "",
        "| model | kind | α | safety | over-refusal | utility | Pareto |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in metrics.models:
        name = f"**{model.label} (this adapter)**" if model.label == this_label else model.label
        pareto = "yes" if model.pareto else ""
        alpha_text = f"{model.alpha:g}" if model.alpha is not None else ""
        lines.append(f"| {name} | {model.kind} | {alpha_text} | {' | '.join(_rates(model))} | {pareto} |")
    lines.append("")
    return lines + recommendation_lines(metrics)


def _input_lines(inputs: Mapping) -> list[str]:
    lines = [f"- Base model: `{inputs.get('base_model')}`"]
    for role in ("utility", "safety"):
        for a in inputs.get(f"{role}_adapters", []):
            digest = a["sha256"][:12]
            lines.append(f"- {role} adapter `{a['name']}` (rank {a['rank']}, weight {a['weight']:g}, sha `{digest}`)")
    for role, data in (inputs.get("data") or {}).items():
        lines.append(
            f"- {role} data: {data['n']} examples, sha256 `{data['sha256'][:12]}`, estimator `{data['estimator']}`"
        )
    return lines


def repair_lines(step: Mapping | None) -> list[str]:
    """The repair step's choice for this adapter (docs/repair.md), when the merge was repaired."""
    if not step:
        return []
    if step["step"] == "calibration":
        return calibration_lines(step)
    params = step["params"]
    chosen = step.get("chosen")
    if "summary" in step:  # a step that words its own outcome
        what = step["summary"]
    elif chosen is None:
        what = f"no direction was ablated: {step.get('reason', 'no candidate qualified')}."
    else:
        what = (
            f"the false-refusal direction of layer {chosen['layer']}, post-instruction token {chosen['position']} "
            f"({step['chosen_by']}), ablated from every residual writer with strength c = {params['strength']:g} "
            f"and λ = {params['lam']:g}" + ("" if params["include_embedding"] else " (token embedding left out)") + "."
        )
    return ["## Repair", "", f"`{step['step']}`: {what}", ""]


def calibration_lines(step: Mapping) -> list[str]:
    """The calibration step's training for this adapter: rank, steps, loss, the sets and their dropped targets."""
    params = step["params"]
    if not step.get("trained"):
        return ["## Repair", "", f"`calibration`: nothing was trained ({step.get('reason', 'steps = 0')}).", ""]
    loss = step["loss"]
    what = (
        f"a rank-{params['rank']} LoRA trained for {params['steps']} steps (learning rate {params['learning_rate']:g}, "
        f"batch {params['batch_size']}, seed {params['seed']}) on the merged model and concatenated to it; "
        f"loss {loss['first_tenth_mean']:.4g} → {loss['last_tenth_mean']:.4g} (means of the first and last tenth)."
    )
    lines = ["## Repair", "", f"`calibration`: {what}", "", "| set | rows | used | generated | dropped refusals |"]
    lines.append("|---|---|---|---|---|")
    for name, s in step.get("sets", {}).items():
        share = step.get("mixture", {}).get(name)
        label = f"{name} ({share:.0%} of a batch)" if share is not None else f"{name} (not used)"
        lines.append(f"| {label} | {s['rows']} | {s['used']} | {s['generated']} | {s.get('dropped_refusals', 0)} |")
    return [*lines, ""]


def model_card(
    *,
    report: Mapping,
    alpha: float,
    base_model: str,
    label: str,
    metrics: Metrics | None = None,
    spec_file: str | None = None,
) -> str:
    """Markdown card of the adapter merged at α by the method of `report` (its merge_report.json); with `metrics`
    (the job's metrics.json) the evaluation table and the recommendation."""
    method = report["method"]
    lines = [
        front_matter(base_model=base_model, method=method["name"]),
        f"# {label}: merged LoRA adapter ({method['name']}, α = {alpha:g})",
        "",
        f"Made with sstmerge {report['sstmerge_version']} on {report['created_at']}.",
        "",
        f"**Method.** {method['description']} Reference: {method['reference']}",
        "",
        "## Recipe",
        "",
        *_input_lines(report["inputs"]),
        "",
        "Parameters:",
        "",
        "```json",
        json.dumps(report["params"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    if spec_file:
        lines += [
            f"The recipe with every input's sha256 is in `{spec_file}` beside this card; re-run it with "
            f"`sstmerge merge --spec {spec_file} --out DIR`.",
            "",
        ]
    lines += repair_lines(report.get("repair", {}).get(f"{alpha:g}"))
    summary = report.get("summary") or {}
    if summary:
        lines += ["## Diagnostics (medians over modules)", ""]
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in summary.items()]
        lines.append("")
    if metrics is not None:
        lines += evaluation_lines(metrics, label)
    lines += [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, 'path/to/this/folder')",
        "```",
        "",
    ]
    return "\n".join(lines)
