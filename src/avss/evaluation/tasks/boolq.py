"""BoolQ: a yes/no question about a Wikipedia passage, " no" against " yes" by log-likelihood
(lm-evaluation-harness ``boolq``, which reads the SuperGLUE copy of the dev set)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.errors import DataError
from avss.evaluation.base import Doc, MultipleChoiceTask, register_task
from avss.evaluation.engine import Loglikelihood, LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row, per_row
from avss.evaluation.metrics import argmax

# SuperGLUE's passages (the ones lm-eval prompts with) are the page title and the paragraph joined by this.
TITLE_SEPARATOR = " -- "
CHOICES = ["no", "yes"]


def boolq_row(row: Row, ref: str) -> Doc:
    """An ``aps/super_glue`` ``boolq`` row (``question``, ``passage`` = ``TITLE -- PARAGRAPH``, ``idx``,
    ``label`` 0 false / 1 true) in the shared file's schema (``title``, ``passage``, ``answer``). The passage
    is split at the first separator, so ``f"{title} -- {passage}"`` is SuperGLUE's passage byte for byte."""
    title, separator, passage = row["passage"].partition(TITLE_SEPARATOR)
    if not separator:
        raise DataError(f"boolq {ref}: the SuperGLUE passage has no {TITLE_SEPARATOR!r} after its title")
    return {
        "id": f"boolq_{ref}",
        "question": row["question"],
        "passage": passage,
        "answer": bool(row["label"]),
        "title": title,
    }


@register_task("boolq")
@dataclass
class BoolQ(MultipleChoiceTask):
    """``accuracy`` of ``argmax`` over the continuations " no" and " yes" (each document's ``choices``,
    chance 1/2; ``label`` is 1 for a true ``answer``) after
    ``"{title} -- {passage}\\nQuestion: {question}?\\nAnswer:"``: the shared file keeps the title apart, and
    lm-eval's SuperGLUE passage starts with it."""

    files: ClassVar[dict[str, str]] = {"dev": "boolq/boolq_dev.jsonl"}
    hub = HubSource("aps/super_glue", "boolq", {"dev": "validation"}, per_row(boolq_row))
    required_fields = ("question", "passage", "answer", "title")

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        return [
            {**row, "choices": list(CHOICES), "label": int(row["answer"])}
            for row in super().documents(rows, origin)
        ]

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        passage = f"{doc['title']}{TITLE_SEPARATOR}{doc['passage']}"
        context = f"{passage}\nQuestion: {doc['question']}?\nAnswer:"
        return [LoglikelihoodRequest(context, f" {choice}") for choice in doc["choices"]]

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        return {"accuracy": float(argmax([result.logprob for result in results]) == doc["label"])}
