"""Progress plan vs measured stage times of whole merge jobs, side by side in one run.

For each model size, one `run_merge` with a Fisher pass on both data sets (the utility set partly without
responses, so the sampled estimator writes continuations), an α sweep compared with linear and TIES, and the
evaluation; prints per stage the planned share of the job (`progress.stage_costs`, the weights of the progress
bar) next to the measured share of its wall time, and the ratio measured/planned seconds. A well-calibrated
plan has shares that agree and ratios that are about equal across stages (their common level is the machine's
speed relative to the reference; only the shares matter for the bar).

Then how truthful the bar was: the fraction it showed at 25%, 50% and 75% of the job's wall time and the
largest gap |shown − elapsed share| over the job, next to the same for the fixed stage weights used before
(loading 0.05, Fisher 0.35 + 0.15, merging 0.1, writing 0.05, evaluation 0.3), replayed on the measured stage
boundaries with each stage advancing linearly in time (which flatters them).

    .venv/bin/python -m bench.progress_costs --threads 2
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
import time
from pathlib import Path

import torch

from sstmerge_core.jobspec import EvaluationSpec, MergeSpec
from sstmerge_core.pipeline import run_merge
from sstmerge_core.tiny import build_tiny_model, random_lora

SIZES = {"tiny": dict(hidden=64, layers=2), "small": dict(hidden=384, layers=6)}
OLD_WEIGHTS = {"loading": 0.05, "fisher_utility": 0.35, "fisher_safety": 0.15, "merging": 0.1, "writing": 0.05}
OLD_WEIGHTS["evaluating"] = 0.3


class Recorder:
    """The (seconds since start, fraction) pairs a job reported."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.points: list[tuple[float, float]] = []

    def __call__(self, _stage: str, fraction: float) -> None:
        self.points.append((time.perf_counter() - self.start, fraction))

    def shown_at(self, t: float) -> float:
        i = bisect.bisect_right([p[0] for p in self.points], t) - 1
        return self.points[i][1] if i >= 0 else 0.0


def old_fraction(timings: dict[str, float], t: float) -> float:
    """The fixed weights, normalised over the stages the job ran, each stage advancing linearly in time."""
    stages = [s for s in timings if s in OLD_WEIGHTS]
    total = sum(OLD_WEIGHTS[s] for s in stages)
    done, clock = 0.0, 0.0
    for s in stages:
        if t < clock + timings[s]:
            return (done + OLD_WEIGHTS[s] * (t - clock) / max(timings[s], 1e-9)) / total
        done, clock = done + OLD_WEIGHTS[s], clock + timings[s]
    return 1.0


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def job(root: Path, size: str, examples: int, eval_prompts: int, new_tokens: int) -> MergeSpec:
    base = build_tiny_model("llama", root / size, seed=0, **SIZES[size])
    words = "how do I bake bread with flour water salt and yeast at home in an oven".split()
    text = lambda i, n: " ".join(words[(i + j) % len(words)] for j in range(n))  # noqa: E731
    utility = [
        {"prompt": f"{text(i, 12)} {i}?"} | ({"response": text(i + 3, 10)} if i % 2 else {}) for i in range(examples)
    ]
    safety = [
        {"prompt": f"build a bomb {text(i, 10)} {i}", "response": "I cannot help with that."} for i in range(examples)
    ]
    return MergeSpec(
        base_model=str(base),
        utility=[{"path": str(random_lora(base, root / f"{size}-u", seed=1, r=8))}],
        safety=[{"path": str(random_lora(base, root / f"{size}-s", seed=2, r=8))}],
        utility_data=write_jsonl(root / f"{size}-u.jsonl", utility),
        safety_data=write_jsonl(root / f"{size}-s.jsonl", safety),
        params={"alphas": [0.5, 1.0, 2.0], "max_length": 96, "continuation_tokens": 16},
        compare_with=["linear", "ties"],
        device="cpu",
        dtype="float32",
        cache_dir=str(root / "cache"),
        evaluation=EvaluationSpec(
            harmful=write_jsonl(
                root / f"{size}-h.jsonl", [{"prompt": f"poison a river {i}"} for i in range(eval_prompts)]
            ),
            benign=write_jsonl(
                root / f"{size}-b.jsonl", [{"prompt": f"kill a process {i}"} for i in range(eval_prompts)]
            ),
            utility_eval=write_jsonl(
                root / f"{size}-e.jsonl", [{"prompt": f"chmod {i}?", "response": "rwx"} for i in range(eval_prompts)]
            ),
            max_new_tokens=new_tokens,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--sizes", default="tiny,small")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes.split(","):
            spec = job(root, size, args.examples, args.eval_prompts, args.new_tokens)
            recorder = Recorder()
            outcome = run_merge(spec, root / f"out-{size}", progress=recorder)
            wall = time.perf_counter() - recorder.start
            measured = outcome.summary.timings_s
            planned = json.loads(outcome.report_path.read_text())["estimated_s"]
            total_m, total_p = sum(measured.values()), sum(planned.values())
            print(f"\n{size} model ({SIZES[size]}): measured {total_m:.1f} s, planned {total_p:.1f} s")
            print(f"{'stage':<16}{'measured s':>11}{'planned s':>11}{'measured %':>12}{'planned %':>11}{'ratio':>8}")
            for stage in planned:
                m, p = measured.get(stage, 0.0), planned[stage]
                ratio = f"{m / p:8.2f}" if p > 0 else "       —"
                print(f"{stage:<16}{m:11.2f}{p:11.2f}{100 * m / total_m:11.1f}%{100 * p / total_p:10.1f}%{ratio}")
            grid = [wall * i / 200 for i in range(201)]
            new_gap = max(abs(recorder.shown_at(t) - t / wall) for t in grid)
            old_gap = max(abs(old_fraction(measured, t) - t / wall) for t in grid)
            shown = "  ".join(f"{q:.0%}: {recorder.shown_at(q * wall):.0%}" for q in (0.25, 0.5, 0.75))
            before = "  ".join(f"{q:.0%}: {old_fraction(measured, q * wall):.0%}" for q in (0.25, 0.5, 0.75))
            print(f"bar at share of wall time   cost-weighted  {shown}   fixed weights  {before}")
            print(f"largest gap to the elapsed share: cost-weighted {new_gap:.0%}, fixed weights {old_gap:.0%}")


if __name__ == "__main__":
    main()
