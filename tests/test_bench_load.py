"""The scaling and load benchmark scripts: their helpers, and a minimal embedded load run end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import load_service, scaling

ROOT = Path(__file__).resolve().parents[1]


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


def test_loopback_guard():
    assert load_service.loopback("redis://127.0.0.1:6379/0")
    assert load_service.loopback("postgresql+psycopg://postgres@localhost:5432/postgres")
    with pytest.raises(SystemExit):
        load_service.loopback("redis://10.0.0.5:6379/0")


def test_wrk_results_are_parsed_and_its_absence_is_a_clear_error(monkeypatch):
    cell = load_service.parse_wrk("Running 3s test\nRESULT 3000 3000000 0 1 0 2 0 1500 25000\n")
    assert cell.requests == 3000 and cell.rate == pytest.approx(1000.0)
    assert (cell.p50_ms, cell.p99_ms) == (1.5, 25.0) and cell.errors == {"read": 1, "non-2xx": 2}
    with pytest.raises(SystemExit):
        load_service.parse_wrk("no result line")
    monkeypatch.setattr(load_service.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="apt-get install -y wrk"):
        load_service.require_wrk()


def test_post_script_sends_the_body(tmp_path):
    body = {"method": "sst", "params": {"alphas": [1.0]}}
    target = load_service.Target("embedded", "POST /merges", None, "/merges", body)
    script = load_service.lua_script(target, tmp_path).read_text()
    assert 'wrk.method = "POST"' in script and json.dumps(body) in script and "RESULT" in script


@pytest.mark.skipif(shutil.which("wrk") is None, reason=load_service.WRK_HINT)
def test_load_service_embedded_smoke():
    """A second of load per cell against the embedded API: no errors, every queued job has its broker message."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.load_service",
            "--seconds",
            "1",
            "--repeats",
            "1",
            "--concurrency",
            "1",
            "4",
            "--post-concurrency",
            "1",
            "--log-level",
            "WARNING",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [
        line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["static"], ["bare"], ["embedded"])
    ]
    # target, method, path, concurrency, requests, errors, …: 2 static, 2 bare, 2 GET /merges/{id}, 1 POST /merges
    assert len(rows) == 7, result.stdout
    assert all(int(row[4]) > 0 and row[5] == "0" for row in rows), result.stdout
    assert "embedded: " in result.stdout and "— ok" in result.stdout, result.stdout
