"""The classifier judge: refusal by a sequence-classification model (declared in `judges.JUDGES` as
`classifier:MODEL[#LABEL]`; this module needs torch and transformers, so the registry imports it only to build one)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError
from .judges import resolve_refusal_label


class ClassifierJudge:
    """Refusal by a sequence-classification model on the completion alone: refused iff the arg-max label is
    the refusal label (given, or the single label whose name contains "refus"/"reject").

    Loaded with transformers' `AutoModelForSequenceClassification`, safetensors only, `trust_remote_code=False`.
    """

    def __init__(
        self,
        model: str,
        *,
        refusal_label: str | None = None,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 512,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..modeling import ModelRef

        ref = ModelRef.parse(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                ref.name_or_path, revision=ref.revision, trust_remote_code=False
            )
            self.model = AutoModelForSequenceClassification.from_pretrained(
                ref.name_or_path, revision=ref.revision, trust_remote_code=False, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"cannot load judge classifier {model}: {first_line}", code="invalid_judge") from exc
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(torch.device(device)).eval()
        labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.refusal_label = resolve_refusal_label(labels, refusal_label, model)
        self.refusal_index = labels.index(self.refusal_label)
        self.batch_size, self.max_length = batch_size, max_length
        self.name = f"classifier:{model}#{self.refusal_label}"

    @classmethod
    def from_argument(cls, argument: str, device: str) -> ClassifierJudge:
        """`<model id or path>[#<refusal label>]`, the text after `classifier:`."""
        model, _, label = argument.partition("#")
        return cls(model, refusal_label=label or None, device=device)

    def judge(self, prompts: Sequence[str], completions: Sequence[str]) -> list[bool]:
        import torch

        verdicts: list[bool] = []
        with torch.no_grad():
            for start in range(0, len(completions), self.batch_size):
                batch = self.tokenizer(
                    list(completions[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.model.device)
                predicted = self.model(**batch).logits.argmax(dim=-1)
                verdicts.extend((predicted == self.refusal_index).tolist())
        return verdicts
