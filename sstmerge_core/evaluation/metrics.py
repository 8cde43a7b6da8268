"""Utility metrics: how well a completion matches the reference response of a utility-eval example.

The registry `UTILITY_METRICS` holds one declaration per metric (mergekit's `@merge_method` shape): its name,
per-example score function, whether scores are 0/1, its direction and its definition. The evaluation settings'
`utility_metric` choices, the CLI's `--utility-metric`, `GET /methods` (`utility_metrics`) and the metric table of
`sstmerge_core/evaluation/README.md` all read it; a new metric is one decorated function here (and its test).

- `exact_match`: normalise(prediction) == normalise(reference), where normalise = strip, case-fold,
  collapse whitespace runs to one space, then strip trailing punctuation `.,;:!?` (and the spaces
  between it). "Paris." matches " paris", "42" does not match "42 km".
- `contains`: the normalised reference occurs in the normalised prediction and is not flanked by word
  characters ("Paris" is in "The capital is Paris!", "4" is not in "42").
- `rouge_l`: ROUGE-L F1 on word tokens (`\\w+` of the case-folded text): with L = LCS length,
  P = L/|prediction|, R = L/|reference|, F1 = 2PR/(P+R) (0 when L = 0).
- `token_f1`: SQuAD's token F1: both texts normalised as SQuAD's evaluation script does (lower-case, ASCII
  punctuation removed, the articles a/an/the removed, split on whitespace); with C the multiset intersection of
  the two token lists, P = |C|/|prediction|, R = |C|/|reference|, F1 = 2PR/(P+R) = 2|C|/(|prediction|+|reference|)
  (0 when C is empty; 1 when both lists are empty, 0 when only one is).
- `nll`: mean per-token negative log-likelihood (nats) of the reference response given the prompt,
  averaged over examples; needs the model, so it is computed by `generation.response_nll`. Lower is
  better, the only such metric.

This module is torch-free (the API imports it for the request schema).
"""

from __future__ import annotations

import inspect
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .stats import Rate

_WHITESPACE = re.compile(r"\s+")
_TRAILING_PUNCTUATION = ".,;:!? "
_WORD = re.compile(r"\w+")


Score = Callable[[str, str], float]


@dataclass(frozen=True)
class UtilityMetric:
    """A utility metric: its per-example score function (None for `nll`, which needs the model) and how to read
    it: `binary` scores are 0/1 (the mean gets a Wilson interval), `higher_is_better` is its direction."""

    name: str
    score: Score | None
    binary: bool
    description: str
    higher_is_better: bool = True

    @property
    def needs_generation(self) -> bool:
        return self.score is not None


UTILITY_METRICS: dict[str, UtilityMetric] = {}


def declare_metric(metric: UtilityMetric) -> UtilityMetric:
    """Add `metric` to the registry; a name declared twice is an error."""
    if metric.name in UTILITY_METRICS:
        raise ValueError(f"utility metric {metric.name!r} is declared twice")
    UTILITY_METRICS[metric.name] = metric
    return metric


def utility_metric(
    name: str, *, binary: bool, higher_is_better: bool = True, description: str | None = None
) -> Callable[[Score], Score]:
    """Declare the decorated `score(prediction, reference) -> float` as utility metric `name`; its definition is
    `description`, by default the first paragraph of the function's docstring."""

    def declare(score: Score) -> Score:
        text = description or " ".join(inspect.cleandoc(score.__doc__ or "").split("\n\n")[0].split())
        if not text:
            raise ValueError(f"utility metric {name!r} has no definition (a docstring or a description)")
        declare_metric(UtilityMetric(name, score, binary, text, higher_is_better))
        return score

    return declare


def normalize(text: str) -> str:
    """Strip, case-fold, collapse whitespace, drop trailing punctuation (the exact_match normal form)."""
    return _WHITESPACE.sub(" ", text.strip().casefold()).rstrip(_TRAILING_PUNCTUATION)


@utility_metric("exact_match", binary=True)
def exact_match(prediction: str, reference: str) -> float:
    """1 iff normalise(prediction) == normalise(reference); normalise = strip, case-fold, collapse whitespace, drop
    trailing .,;:!?"""
    return float(normalize(prediction) == normalize(reference))


@utility_metric("contains", binary=True)
def contains(prediction: str, reference: str) -> float:
    """1 iff the normalised reference occurs in the normalised prediction as whole words (not flanked by word
    characters)"""
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


@utility_metric("rouge_l", binary=False)
def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on `\\w+` tokens of the case-folded texts: 2PR/(P+R), P = LCS/|prediction|, R = LCS/|reference|
    (0 when LCS = 0)"""
    pred, ref = _WORD.findall(prediction.casefold()), _WORD.findall(reference.casefold())
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_SQUAD_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_tokens(text: str) -> list[str]:
    """SQuAD's `normalize_answer(text).split()`: lower-case, drop ASCII punctuation, drop a/an/the, split."""
    return _SQUAD_ARTICLES.sub(" ", text.lower().translate(_SQUAD_PUNCTUATION)).split()


@utility_metric("token_f1", binary=False)
def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: 2PR/(P+R) = 2|C|/(|prediction|+|reference|), P = |C|/|prediction|, R = |C|/|reference|, over
    the normalised token lists (`squad_tokens`: lower-case, no punctuation, no a/an/the), C their multiset
    intersection; 1 when both lists are empty, 0 when only one is"""
    pred, ref = squad_tokens(prediction), squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


declare_metric(
    UtilityMetric(
        "nll",
        None,
        binary=False,
        description="mean per-token negative log-likelihood (nats) of the reference response given the prompt, "
        "averaged over examples (no generation; lower is better)",
        higher_is_better=False,
    )
)


def summarize_utility(metric: UtilityMetric, scores: list[float]) -> dict:
    """{"value": mean score, "n", "k", "ci_low", "ci_high"}; k and the Wilson interval only for 0/1 metrics."""
    if not scores:
        raise ValueError("no utility scores to summarise")
    if metric.binary:
        rate = Rate.count([s == 1.0 for s in scores])
        return {"value": rate.rate, "n": rate.n, "k": rate.k, "ci_low": rate.ci_low, "ci_high": rate.ci_high}
    return {"value": sum(scores) / len(scores), "n": len(scores), "k": None, "ci_low": None, "ci_high": None}
