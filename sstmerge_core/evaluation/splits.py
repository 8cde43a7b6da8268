"""Search and report splits of the evaluation sets.

Any choice made from evaluation numbers (the recommended model, a search, a threshold) is made on the
*search* part of each set and reported on the disjoint *report* part, which the choice never saw.

The split of a set of n prompts: rank the prompts by sha256(f"{seed}\\0{set name}\\0{prompt}") (ties, i.e.
repeated prompts, by position); the first n_report = ⌊n · report_fraction⌋, kept within [1, n − 1]
when n ≥ 2, form the report part, the rest the search part; both keep file order. The split depends only
on the seed, the fraction and the prompt texts: it is the same on every machine and Python hash seed, does
not change when rows are reordered, and a prompt stays in its part when other rows are added.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SPLIT_NAMES = ("search", "report")
SET_NAMES = ("harmful", "benign", "utility_eval")


def report_size(n: int, report_fraction: float) -> int:
    """⌊n · report_fraction⌋ (an odd prompt goes to the search part), kept within [1, n − 1] when n ≥ 2 (0 when
    n ≤ 1)."""
    if not 0 < report_fraction < 1:
        raise ValueError(f"report_fraction must lie in (0, 1), got {report_fraction}")
    if n < 2:
        return 0
    return min(max(math.floor(n * report_fraction + 1e-9), 1), n - 1)


def split_indices(prompts: Sequence[str], set_name: str, seed: int, report_fraction: float) -> dict[str, list[int]]:
    """{"search": [...], "report": [...]}: disjoint row indices covering every prompt, each list ascending."""

    def key(i: int) -> tuple[str, int]:
        digest = hashlib.sha256(f"{seed}\0{set_name}\0{prompts[i]}".encode()).hexdigest()
        return digest, i

    ranked = sorted(range(len(prompts)), key=key)
    size = report_size(len(prompts), report_fraction)
    return {"search": sorted(ranked[size:]), "report": sorted(ranked[:size])}


@dataclass(frozen=True)
class Splits:
    """The search/report row indices of the three evaluation sets, and how they were drawn."""

    seed: int
    report_fraction: float
    indices: Mapping[str, Mapping[str, list[int]]]
    """indices[set name][split name] → ascending row indices of that set."""

    @classmethod
    def of(cls, prompts: Mapping[str, Sequence[str]], seed: int, report_fraction: float) -> Splits:
        """`prompts[set name]` → the prompts of that set, in file order."""
        indices = {name: split_indices(rows, name, seed, report_fraction) for name, rows in prompts.items()}
        return cls(seed, report_fraction, indices)

    def rows(self, set_name: str, split: str) -> list[int]:
        return list(self.indices[set_name][split])

    def to_dict(self) -> dict:
        """{"seed", "report_fraction", "rule", "sizes": {set: {split: n}}, "report_indices": {set: [...]}}."""
        return {
            "seed": self.seed,
            "report_fraction": self.report_fraction,
            "rule": "report: the ⌊n·fraction⌋ prompts of lowest sha256(seed, set, prompt); search: the rest",
            "sizes": {s: {name: len(part) for name, part in parts.items()} for s, parts in self.indices.items()},
            "report_indices": {s: list(parts["report"]) for s, parts in self.indices.items()},
        }
