"""Which false-refusal direction to ablate: every (layer, post-instruction position) candidate is scored by
ablating it with forward hooks and reading the next-token distribution at the end of held-apart prompts.

A candidate is eligible when its ablation keeps the harmless next-token distribution close,
mean KL(p ‖ p_ablated) ≤ κ, and keeps the harmful refusal log-odds within a margin m of their value without
ablation; among eligible candidates the one that lowers the borderline (pseudo-harmful) refusal log-odds most
is chosen (Wang et al., ICLR 2025, after Arditi et al., 2024). No candidate → no repair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..methods.catalog import RefusalAblationParams
from .directions import kl_divergence, refusal_log_odds
from .residual import ablated, last_token_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class PromptSets:
    """The selection halves of the three prompt sets."""

    harmful: Sequence[str]
    harmless: Sequence[str]
    borderline: Sequence[str]


@dataclass(frozen=True)
class Scores:
    """Mean refusal log-odds on harmful and borderline prompts and mean harmless KL (0 without ablation)."""

    harmful: float
    borderline: float
    kl: float = 0.0


@dataclass(frozen=True)
class CandidateScore:
    layer: int
    position: int
    scores: Scores
    eligible: bool

    def to_dict(self) -> dict:
        return {"layer": self.layer, "position": self.position, **asdict(self.scores), "eligible": self.eligible}


def is_eligible(scores: Scores, baseline: Scores, params: RefusalAblationParams) -> bool:
    """KL on harmless prompts ≤ κ and harmful refusal log-odds ≥ baseline − m."""
    return scores.kl <= params.kl_threshold and scores.harmful >= baseline.harmful - params.harmful_margin


def choose(candidates: Sequence[CandidateScore], baseline: Scores) -> CandidateScore | None:
    """The eligible candidate with the lowest borderline refusal log-odds (ties: lower KL), if it lowers them."""
    eligible = [c for c in candidates if c.eligible and c.scores.borderline < baseline.borderline]
    return min(eligible, key=lambda c: (c.scores.borderline, c.scores.kl), default=None)


def score_candidates(
    model: PreTrainedModel,
    tokenizer,
    writers: dict[str, nn.Module],
    directions: dict[tuple[int, int], torch.Tensor],
    prompts: PromptSets,
    refusal_ids: torch.Tensor,
    params: RefusalAblationParams,
    *,
    on_candidate: Callable[[int, int], None] | None = None,
) -> tuple[Scores, list[CandidateScore]]:
    """Scores without ablation, and with the ablation of each candidate v̂ (keyed by (layer, position))."""
    batch = params.batch_size

    def read() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            last_token_logits(model, tokenizer, prompts.harmful, batch),
            last_token_logits(model, tokenizer, prompts.harmless, batch),
            last_token_logits(model, tokenizer, prompts.borderline, batch),
        )

    harmful, harmless, borderline = read()
    baseline = Scores(
        float(refusal_log_odds(harmful, refusal_ids).mean()), float(refusal_log_odds(borderline, refusal_ids).mean())
    )
    scored = []
    for done, ((layer, position), direction) in enumerate(directions.items(), start=1):
        with ablated(writers, direction, params.strength):
            h, b, p = read()
        scores = Scores(
            float(refusal_log_odds(h, refusal_ids).mean()),
            float(refusal_log_odds(p, refusal_ids).mean()),
            float(kl_divergence(harmless, b).mean()),
        )
        scored.append(CandidateScore(layer, position, scores, is_eligible(scores, baseline, params)))
        if on_candidate is not None:
            on_candidate(done, len(directions))
    return baseline, scored
