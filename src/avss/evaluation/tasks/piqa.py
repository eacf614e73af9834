"""PIQA: which of two solutions achieves the goal, by log-likelihood after "Question: GOAL\\nAnswer:"
(lm-evaluation-harness ``piqa``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import ChoiceTask, Doc, register_task
from avss.evaluation.engine import LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row, per_row


def piqa_row(row: Row, ref: str) -> Doc:
    """A ``baber/piqa`` row (``goal``, ``sol1``, ``sol2``, ``label``), the copy lm-eval 0.4 reads
    (``ybisk/piqa`` is a loading script, which current ``datasets`` no longer runs)."""
    return {
        "id": f"piqa_{ref}",
        "goal": row["goal"],
        "sol1": row["sol1"],
        "sol2": row["sol2"],
        "label": int(row["label"]),
    }


@register_task("piqa")
@dataclass
class PIQA(ChoiceTask):
    """``accuracy`` and ``accuracy_norm`` (per-character) over ``[sol1, sol2]``, kept as each document's
    ``choices`` (chance 1/2). Solutions are scored exactly as stored, trailing spaces included, as lm-eval
    does."""

    files: ClassVar[dict[str, str]] = {"valid": "piqa/piqa_valid.jsonl"}
    hub = HubSource("baber/piqa", None, {"valid": "validation"}, per_row(piqa_row))
    required_fields = ("goal", "sol1", "sol2", "label")

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        return [{**row, "choices": [row["sol1"], row["sol2"]]} for row in super().documents(rows, origin)]

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        context = f"Question: {doc['goal']}\nAnswer:"
        return [LoglikelihoodRequest(context, f" {choice}") for choice in doc["choices"]]
