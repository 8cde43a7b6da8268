"""The GPU benchmark script runs end to end on a CPU at toy scale (so it is ready when a GPU is lent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_8b_script_smoke(tmp_path):
    out = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_8b",
            "--layers",
            "2",
            "--hidden",
            "64",
            "--mlp",
            "128",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--vocab",
            "256",
            "--samples",
            "4",
            "--seq-len",
            "16",
            "--rank",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )
    report = json.loads(out.read_text())
    assert report["modules"] == 14 and report["fisher_tokens_per_s"] > 0
    assert set(report["gevp_projection_s"]) == {"soft", "topk"}


def test_testbed_table_compares_at_matched_safety():
    """Other merges are compared with linear's front interpolated at their own safety, never extrapolated."""
    from bench.testbed.table import matched_safety, selection
    from sstmerge_core.evaluation.stats import Rate
    from tests.helpers.contracts import model_entry

    assert selection({"selection": "topk", "k": 16}) == "topk k=16"
    assert selection({"selection": "soft", "beta": 1.0, "utility_fisher": "empirical"}) == "soft β=1, empirical F_U"
    assert selection({}) == ""

    def point(method, alpha, safety, over, utility):
        utility_block = {"value": utility, "n": 10, "k": None, "ci_low": None, "ci_high": None}
        kind = "baseline" if method != "sst" else "merged"
        rates = Rate.of(round(safety * 10), 10).to_dict(), Rate.of(round(over * 10), 10).to_dict()
        return model_entry(f"{method} @{alpha:g}", kind, *rates, utility_block, method=method, alpha=alpha)

    models = [
        point("linear", 0.5, 0.2, 0.1, 0.8),
        point("linear", 1.0, 0.6, 0.5, 0.4),
        point("linear", 3.0, 0.3, 0.9, 0.0),  # past linear's safest α: a broken model, not on the front
        point("sst", 1.0, 0.4, 0.2, 0.7),
        point("sst", 2.0, 0.9, 0.6, 0.3),
    ]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in matched_safety(models).splitlines()[2:]}
    assert set(rows) == {"sst @1", "sst @2"}
    # At safety 0.4, linear's front is halfway: over-refusal 0.3, utility 0.6.
    assert rows["sst @1"].endswith("| 0.300 | 0.600 | -0.100 | +0.100 |")
    assert "outside linear's safety range [0.200, 0.600]" in rows["sst @2"]
