"""SciQ: 4-way multiple choice after the support passage, by log-likelihood (lm-evaluation-harness prompt)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import ChoiceTask, Doc, register_task
from avss.evaluation.engine import LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row, per_row


def sciq_row(row: Row, ref: str) -> Doc:
    """An ``allenai/sciq`` row (``distractor1..3``, ``correct_answer``, ``support``) built exactly as the
    shared files were: the distractors in order, the correct answer inserted at index
    ``sha1(question.strip()) % 4``, so the correct option is not always in the same place and hub and file
    documents are identical."""
    question = row["question"]
    label = int(hashlib.sha1(question.strip().encode("utf-8")).hexdigest(), 16) % 4
    choices = [row["distractor1"], row["distractor2"], row["distractor3"]]
    choices.insert(label, row["correct_answer"])
    return {
        "id": f"sciq_{ref}",
        "question": question,
        "choices": choices,
        "label": label,
        "correct_answer": row["correct_answer"],
        "support": row["support"],
    }


@register_task("sciq")
@dataclass
class SciQ(ChoiceTask):
    """``accuracy`` compares summed log-likelihoods; ``accuracy_norm`` divides them by the option's length in
    characters, which removes the bias towards short options (lm-evaluation-harness ``acc_norm``)."""

    split: str = "test"

    files: ClassVar[dict[str, str]] = {"test": "sciq/sciq_test.jsonl", "valid": "sciq/sciq_valid.jsonl"}
    hub = HubSource("allenai/sciq", None, {"test": "test", "valid": "validation"}, per_row(sciq_row))
    required_fields = ("question", "choices", "label", "support")

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
        return [LoglikelihoodRequest(context, f" {choice}") for choice in doc["choices"]]
