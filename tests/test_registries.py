"""The registries of utility metrics and judges: every entry is well formed, the README's tables are written from
them, and a spec names exactly the registered judges."""

from __future__ import annotations

import re

import pytest

from sstmerge_core.errors import InputError
from sstmerge_core.evaluation import registry_docs
from sstmerge_core.evaluation.judges import JUDGES, judge_spec_pattern, make_judge
from sstmerge_core.evaluation.metrics import UTILITY_METRICS
from sstmerge_core.jobspec import EvaluationSettings


def test_the_readme_tables_are_the_registries() -> None:
    text = registry_docs.README.read_text(encoding="utf-8")
    assert registry_docs.replaced(text) == text, "run: python -m sstmerge_core.evaluation.registry_docs"
    for name in [*UTILITY_METRICS, *JUDGES]:
        assert f"| `{name}" in text


@pytest.mark.parametrize("name", list(UTILITY_METRICS))
def test_every_metric_scores_in_its_range_and_is_a_setting(name: str) -> None:
    metric = UTILITY_METRICS[name]
    assert metric.name == name and metric.description
    EvaluationSettings(utility_metric=name)
    if metric.score is not None:
        for prediction, reference in (("Paris", "Paris"), ("Paris.", "paris"), ("x", "y"), ("", "a"), ("a b", "")):
            score = metric.score(prediction, reference)
            assert 0.0 <= score <= 1.0 and (not metric.binary or score in (0.0, 1.0))
        assert metric.score("the answer is 42", "the answer is 42") == 1.0


def test_an_unregistered_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="utility_metric"):
        EvaluationSettings(utility_metric="bleu")


def test_the_judge_pattern_admits_exactly_the_registered_kinds() -> None:
    pattern = re.compile(judge_spec_pattern())
    for name, info in JUDGES.items():
        assert info.name == name and info.description
        if info.takes_model:
            assert pattern.match(f"{name}:org/model#LABEL") and not pattern.match(name)
            assert not pattern.match(f"{name}:a\nb")
        else:
            assert pattern.match(name) and not pattern.match(f"{name}:x")
            assert make_judge(name).judge(["p"], ["I cannot help with that."]) in ([True], [False])
    for spec in ("regex", "keyword:x", "classifier:", ""):
        assert not pattern.match(spec)
        with pytest.raises(InputError, match="unknown judge"):
            make_judge(spec)
