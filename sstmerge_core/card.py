"""The model card (`README.md`) of a merged adapter, written once the job is finished: Hub front matter, the
recipe, the merge diagnostics and, when the job was evaluated, the table of every evaluated model with the
recommendation."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCardData

RATE_COLUMNS = (("safety", "safety"), ("over_refusal", "over-refusal"), ("utility", "utility"))


def front_matter(*, base_model: str, method: str) -> str:
    """YAML front matter as on the Hub: `base_model` (a Hub id or a folder name), `library_name`, `tags`."""
    data = ModelCardData(base_model=base_model, library_name="peft", tags=["lora", "merge", "sstmerge", method])
    return f"---\n{data.to_yaml()}\n---\n"


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _interval(block: Mapping | None) -> str:
    """`0.850 [0.62, 0.95]` from a rate ({"rate", "ci_low", "ci_high"}) or a utility ({"value", …}) block."""
    if not isinstance(block, Mapping):
        return "—"
    value = block.get("rate", block.get("value"))
    text = _number(value)
    if block.get("ci_low") is not None and block.get("ci_high") is not None:
        text += f" [{_number(block['ci_low'], 2)}, {_number(block['ci_high'], 2)}]"
    return text


def _model_name(entry: Any) -> str:
    """A recommended / runner-up entry: a label, or a dict with `label` (and `alpha`)."""
    if isinstance(entry, Mapping):
        label = entry.get("label")
        if label is None:
            return "none"
        return f"`{label}`" + (f" (α = {entry['alpha']:g})" if isinstance(entry.get("alpha"), (int, float)) else "")
    return "none" if entry is None else f"`{entry}`"


def _tolerances(recommended: Mapping, metrics: Mapping) -> str | None:
    tolerances = recommended.get("tolerances")
    if tolerances is None:
        tolerances = {
            "utility_drop": metrics.get("utility_tolerance"),
            "over_refusal_increase": metrics.get("over_refusal_tolerance"),
        }
    if isinstance(tolerances, Mapping):
        parts = [f"{k} ≤ {v:g}" if isinstance(v, (int, float)) else f"{k}: unbounded" for k, v in tolerances.items()]
        return ", ".join(parts) if parts else None
    return str(tolerances)


def recommendation_lines(metrics: Mapping) -> list[str]:
    """The recommendation of `metrics["recommended"]`: whatever of rule, tolerances, chosen model, runner-up and
    reason it holds."""
    recommended = metrics.get("recommended")
    if not isinstance(recommended, Mapping):
        return []
    lines = ["**Recommendation.**", ""]
    if recommended.get("rule"):
        lines.append(f"- rule: {recommended['rule']}")
    tolerances = _tolerances(recommended, metrics)
    if tolerances:
        lines.append(f"- tolerances: {tolerances}")
    chosen = recommended.get("label")
    lines.append(f"- chosen: {_model_name(recommended) if chosen is not None else 'nothing qualifies'}")
    if "runner_up" in recommended:
        lines.append(f"- runner-up: {_model_name(recommended['runner_up'])}")
    if recommended.get("reason"):
        lines.append(f"- reason: {recommended['reason']}")
    if recommended.get("warning"):
        lines.append(f"- **{recommended['warning']}**")
    lines += [f"- {note}" for note in recommended.get("near_tie") or []]
    return [*lines, "", *price_table(recommended)]


def price_table(recommended: Mapping) -> list[str]:
    """The price list (`evaluation/pricing.py`) as a markdown table: per safety target, the merge of lowest
    over-refusal reaching it within the utility tolerance, picked on the search split, numbers of the report split."""
    block = recommended.get("price_list")
    if not isinstance(block, Mapping):
        return []
    split = block.get("reported_on", "report")
    lines = [
        f"**Price of safety** ({block.get('rule', '')}; numbers of the {split} split).",
        "",
        "| safety target | merge | safety | over-refusal | utility |",
        "|---|---|---|---|---|",
    ]
    for row in block.get("targets", []):
        numbers = row.get(split) or {}
        if row.get("label") is None:
            lines.append(f"| ≥ {row['target']:.2f} | none reaches it | | | |")
            continue
        cells = [_interval(numbers.get(key)) for key, _ in RATE_COLUMNS]
        lines.append(f"| ≥ {row['target']:.2f} | {_model_name(row)} | {' | '.join(cells)} |")
    return [*lines, ""]


def evaluation_lines(metrics: Mapping, this_label: str) -> list[str]:
    """The `## Evaluation` section: settings, one row per evaluated model (this adapter marked), recommendation."""
    datasets = metrics.get("datasets") or {}
    sizes = ", ".join(f"{name} n = {block.get('n')}" for name, block in datasets.items() if isinstance(block, Mapping))
    lines = [
        "## Evaluation",
        "",
        f"Held-out prompts ({sizes}); judge `{metrics.get('judge')}`, utility metric "
        f"`{metrics.get('utility_metric')}`, greedy decoding, {metrics.get('max_new_tokens')} new tokens, "
        "95% Wilson intervals. Over-refusal is the refusal rate on benign prompts. "
        f"Derived metrics compare with `{metrics.get('reference')}`.",
        "",
        "| model | kind | α | safety | over-refusal | utility | Pareto |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in metrics.get("models", []):
        label = model.get("label", "?")
        name = f"**{label} (this adapter)**" if label == this_label else label
        alpha = model.get("alpha")
        cells = [_interval(model.get(key)) for key, _ in RATE_COLUMNS]
        pareto = "yes" if model.get("pareto") else ""
        alpha_text = f"{alpha:g}" if isinstance(alpha, (int, float)) else ""
        lines.append(f"| {name} | {model.get('kind', '')} | {alpha_text} | {' | '.join(cells)} | {pareto} |")
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
    metrics: Mapping | None = None,
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
