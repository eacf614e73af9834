"""ARC-Easy and ARC-Challenge: multiple choice after "Question: ...\\nAnswer:", by log-likelihood
(lm-evaluation-harness ``arc_easy`` / ``arc_challenge``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import ChoiceTask, Doc, register_task
from avss.evaluation.engine import LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row, RowConverter, per_row


def arc_row(prefix: str) -> RowConverter:
    """A converter of ``allenai/ai2_arc`` rows (``id``, ``question``, ``choices`` as ``{text, label}``,
    ``answerKey``) to the shared files' schema, ids ``PREFIX_SPLIT_NNNN``."""

    def convert(row: Row, ref: str) -> Doc:
        labels = list(row["choices"]["label"])
        return {
            "id": f"{prefix}_{ref}",
            "source_id": row["id"],
            "question": row["question"],
            "choices": list(row["choices"]["text"]),
            "labels": labels,
            "answer_key": row["answerKey"],
            "answer_index": labels.index(row["answerKey"]),
        }

    return convert


@dataclass
class ARC(ChoiceTask):
    """``accuracy`` compares summed log-likelihoods of `` OPTION``; ``accuracy_norm`` divides them by the
    option's length in characters (lm-evaluation-harness ``acc`` and ``acc_norm``). Most questions have 4
    options, a few 3 or 5 (chance is ``1 / len(choices)`` per question). Each document's ``label`` is its
    ``answer_index``."""

    required_fields = ("question", "choices", "answer_index")

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        return [{**row, "label": row["answer_index"]} for row in super().documents(rows, origin)]

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        context = f"Question: {doc['question']}\nAnswer:"
        return [LoglikelihoodRequest(context, f" {choice}") for choice in doc["choices"]]


@register_task("arc_easy")
@dataclass
class ARCEasy(ARC):
    """The shared file is the part of the ARC-Easy test split not held out (1,584 of 2,376 questions); the
    hub split is all of it."""

    files: ClassVar[dict[str, str]] = {"test": "arc_easy/arc_easy_test.jsonl"}
    hub = HubSource("allenai/ai2_arc", "ARC-Easy", {"test": "test"}, per_row(arc_row("arc_easy")))


@register_task("arc_challenge")
@dataclass
class ARCChallenge(ARC):
    files: ClassVar[dict[str, str]] = {"test": "arc_challenge/arc_challenge_test.jsonl"}
    hub = HubSource("allenai/ai2_arc", "ARC-Challenge", {"test": "test"}, per_row(arc_row("arc_challenge")))
