"""Utility metrics: how well a completion matches the reference response of a utility-eval example.

- `exact_match`: normalise(prediction) == normalise(reference), where normalise = strip, case-fold,
  collapse whitespace runs to one space, then strip trailing punctuation `.,;:!?` (and the spaces
  between it). "Paris." matches " paris", "42" does not match "42 km".
- `contains`: the normalised reference occurs in the normalised prediction and is not flanked by word
  characters ("Paris" is in "The capital is Paris!", "4" is not in "42").
- `rouge_l`: ROUGE-L F1 on word tokens (`\\w+` of the case-folded text): with L = LCS length,
  P = L/|prediction|, R = L/|reference|, F1 = 2PR/(P+R) (0 when L = 0).
- `nll`: mean per-token negative log-likelihood (nats) of the reference response given the prompt,
  averaged over examples; needs the model, so it is computed by `generation.response_nll`. Lower is
  better, the only such metric.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .stats import Rate

_WHITESPACE = re.compile(r"\s+")
_TRAILING_PUNCTUATION = ".,;:!? "
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Strip, case-fold, collapse whitespace, drop trailing punctuation (the exact_match normal form)."""
    return _WHITESPACE.sub(" ", text.strip().casefold()).rstrip(_TRAILING_PUNCTUATION)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """1.0 if the normalised reference occurs in the normalised prediction as whole words, else 0.0."""
    needle = normalize(reference)
    if not needle:
        return 0.0
    return float(re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", normalize(prediction)) is not None)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(|a|·|b|) dynamic programme)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 = 2PR/(P+R) with P = LCS/|prediction|, R = LCS/|reference| on `\\w+` tokens."""
    pred, ref = _WORD.findall(prediction.casefold()), _WORD.findall(reference.casefold())
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class UtilityMetric:
    """A utility metric: its per-example score function (None for `nll`) and how to read it."""

    name: str
    score: Callable[[str, str], float] | None
    binary: bool
    higher_is_better: bool = True

    @property
    def needs_generation(self) -> bool:
        return self.score is not None


UTILITY_METRICS: dict[str, UtilityMetric] = {
    "exact_match": UtilityMetric("exact_match", exact_match, binary=True),
    "contains": UtilityMetric("contains", contains, binary=True),
    "rouge_l": UtilityMetric("rouge_l", rouge_l, binary=False),
    "nll": UtilityMetric("nll", None, binary=False, higher_is_better=False),
}


def summarize_utility(metric: UtilityMetric, scores: list[float]) -> dict:
    """{"value": mean score, "n", "k", "ci_low", "ci_high"}; k and the Wilson interval only for 0/1 metrics."""
    if not scores:
        raise ValueError("no utility scores to summarise")
    if metric.binary:
        rate = Rate.count([s == 1.0 for s in scores])
        return {"value": rate.rate, "n": rate.n, "k": rate.k, "ci_low": rate.ci_low, "ci_high": rate.ci_high}
    return {"value": sum(scores) / len(scores), "n": len(scores), "k": None, "ci_low": None, "ci_high": None}
