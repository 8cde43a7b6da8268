"""bench/RESULTS.md holds rendered results: no unrendered `{placeholder}` outside code, and the recipe-search and
boundary sections are the tables rendered from the committed JSON (bench/results/testbed_search, .../boundary)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench.testbed.search import render

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def prose(markdown: str) -> str:
    """The markdown without fenced code blocks and inline code spans (where `{id}` is a URL pattern, not a slot)."""
    without_fences = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", without_fences)


def test_prose_strips_code_but_keeps_text():
    text = "a {table}\n```\nGET /jobs/{id}\n```\nsee `GET /merges/{id}` and {other}\n"
    assert PLACEHOLDER.findall(prose(text)) == ["{table}", "{other}"]


def test_results_md_has_no_unrendered_placeholder():
    assert PLACEHOLDER.findall(prose(RESULTS.read_text(encoding="utf-8"))) == []


def test_recipe_search_table_is_the_committed_one():
    folder = ROOT / "bench" / "results" / "testbed_search"
    report = json.loads((folder / "search" / "search_report.json").read_text())
    table = json.loads((folder / "table.json").read_text())
    rendered = render(report, table)
    assert "| at safety | family |" in rendered
    assert rendered in RESULTS.read_text(encoding="utf-8")


def test_boundary_table_is_the_committed_one():
    """The calibration / answer-alignment section's table is rendered from bench/results/boundary/table.json."""
    from bench.testbed.boundary import points_table

    table = json.loads((ROOT / "bench" / "results" / "boundary" / "table.json").read_text())
    rendered = "\n".join(points_table(table))
    assert rendered.count("\n") == 1 + sum(len(rows) for rows in table["families"].values())
    assert rendered in RESULTS.read_text(encoding="utf-8")
