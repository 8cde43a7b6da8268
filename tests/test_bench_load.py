"""The scaling and load benchmark scripts: their helpers, and a minimal embedded load run end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import load_service, scaling  # noqa: E402


def test_fit_slope_recovers_power_laws():
    xs = [4, 8, 16, 32, 64]
    assert scaling.fit_slope(xs, [x**3 for x in xs]) == pytest.approx(3.0)
    assert scaling.fit_slope(xs, [5.0 for _ in xs]) == pytest.approx(0.0)


def test_factor_grid_varies_one_factor_at_a_time():
    for quick in (True, False):
        for factor, (_, group) in scaling.factor_grid(quick).items():
            assert len(group) >= 2 and len(set(group)) == len(group), factor
            fields = [
                f
                for f in ("hidden", "layers", "rank", "hooked_layers", "samples")
                if len({getattr(s, f) for s in group}) > 1
            ]
            assert len(fields) == 1, (factor, fields)


def test_percentile_and_loopback_guard():
    values = [float(v) for v in range(1, 101)]
    assert load_service.percentile(values, 0.5) in (50.0, 51.0)
    assert load_service.percentile(values, 0.99) == 99.0
    assert load_service.loopback("redis://127.0.0.1:6379/0")
    assert load_service.loopback("postgresql+psycopg://postgres@localhost:5432/postgres")
    with pytest.raises(SystemExit):
        load_service.loopback("redis://10.0.0.5:6379/0")


def test_load_service_embedded_smoke():
    """A few requests against the embedded API only: no errors, every accepted job queued once."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load_service.py"),
            "--embedded-only",
            "--requests",
            "4",
            "--repeats",
            "1",
            "--concurrency",
            "1",
            "2",
            "--log-level",
            "WARNING",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("embedded ")]
    assert len(rows) == 4 and all(row[5] == "0" for row in rows), result.stdout  # the errors column
    assert "— ok" in result.stdout, result.stdout
