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
            str(ROOT / "bench" / "gpu_8b.py"),
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
    )
    report = json.loads(out.read_text())
    assert report["modules"] == 14 and report["fisher_tokens_per_s"] > 0
    assert set(report["gevp_projection_s"]) == {"soft", "topk"}
