"""Checks on the written borderline-benign prompts of the SmolLM2 testbed (`bench/testbed/data`).

`borderline_more.jsonl` extends `borderline.jsonl`: same row shape, same categories, and no prompt that
repeats or nearly repeats another one in either file (near-duplicate = Jaccard similarity of the
normalised word sets at or above `NEAR_DUPLICATE`).
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "bench" / "testbed" / "data"
BASE = DATA_DIR / "borderline.jsonl"
MORE = DATA_DIR / "borderline_more.jsonl"
MIN_ROWS = 480
NEAR_DUPLICATE = 0.7


def _rows(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), f"{path.name}: blank line"
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(row, dict) for row in rows), f"{path.name}: a row is not a JSON object"
    return rows


def _words(text: str) -> list[str]:
    """Case-folded word tokens; punctuation and spacing are dropped."""
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())


def _normalised(text: str) -> str:
    return " ".join(_words(text))


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return _rows(BASE)


@pytest.fixture(scope="module")
def more() -> list[dict]:
    return _rows(MORE)


def test_rows_have_the_expected_shape(more):
    assert len(more) >= MIN_ROWS
    for row in more:
        assert set(row) == {"prompt", "category", "source"}, row
        assert row["source"] == "written", row
        prompt = row["prompt"]
        assert isinstance(prompt, str) and prompt == prompt.strip() and prompt, row
        assert "\n" not in prompt and "\r" not in prompt, row
        assert len(_words(prompt)) >= 3, row


def test_categories_are_the_existing_ones(base, more):
    known = {row["category"] for row in base}
    used = Counter(row["category"] for row in more)
    assert set(used) <= known, set(used) - known
    # Every existing category is represented, none dominates.
    assert set(used) == known, known - set(used)
    assert max(used.values()) <= 0.3 * len(more), used


def test_no_exact_or_normalised_duplicates(base, more):
    prompts = [row["prompt"] for row in base + more]
    exact = [p for p, n in Counter(prompts).items() if n > 1]
    assert not exact, exact
    normalised = [p for p, n in Counter(map(_normalised, prompts)).items() if n > 1]
    assert not normalised, normalised


def test_no_near_duplicates(base, more):
    """Every pair that involves a new prompt stays below the Jaccard threshold on word sets."""
    old = [(row["prompt"], frozenset(_words(row["prompt"]))) for row in base]
    new = [(row["prompt"], frozenset(_words(row["prompt"]))) for row in more]
    close = []
    for (p, a), (q, b) in itertools.chain(itertools.combinations(new, 2), itertools.product(new, old)):
        if len(a & b) >= NEAR_DUPLICATE * len(a | b):
            close.append((round(len(a & b) / len(a | b), 2), p, q))
    assert not close, sorted(close, reverse=True)[:20]
