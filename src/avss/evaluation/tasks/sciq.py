"""SciQ: 4-way multiple choice after the support passage, by log-likelihood (lm-evaluation-harness prompt)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import Doc, MultipleChoiceTask, register_task
from avss.evaluation.engine import Loglikelihood, LoglikelihoodRequest
from avss.evaluation.metrics import argmax, length_normalized


@register_task("sciq")
@dataclass
class SciQ(MultipleChoiceTask):
    """``accuracy`` compares summed log-likelihoods; ``accuracy_norm`` divides them by the option's length in
    characters, which removes the bias towards short options (lm-evaluation-harness ``acc_norm``)."""

    split: str = "test"

    files: ClassVar[dict[str, str]] = {"test": "sciq/sciq_test.jsonl", "valid": "sciq/sciq_valid.jsonl"}
    required_fields = ("question", "choices", "label", "support")

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
        return [LoglikelihoodRequest(context, f" {choice}") for choice in doc["choices"]]

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        scores = [result.logprob for result in results]
        return {
            "accuracy": float(argmax(scores) == doc["label"]),
            "accuracy_norm": float(argmax(length_normalized(scores, doc["choices"])) == doc["label"]),
        }
