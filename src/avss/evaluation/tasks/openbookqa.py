"""OpenBookQA (main): the bare question stem continued by each option, by log-likelihood
(lm-evaluation-harness ``openbookqa``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import ChoiceTask, Doc, register_task
from avss.evaluation.engine import LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row


def openbookqa_rows(rows: Sequence[Row], split: str) -> list[Doc]:
    """``allenai/openbookqa`` ``main`` rows (``id``, ``question_stem``, ``choices`` as ``{text, label}``,
    ``answerKey``) in the shared file's schema, ids ``obqa_SPLIT_NNN`` as there. lm-eval strips the
    answer key's leading whitespace before looking it up among the labels; so does this."""
    docs = []
    for index, row in enumerate(rows):
        labels = list(row["choices"]["label"])
        docs.append(
            {
                "id": f"obqa_{split}_{index:03d}",
                "source_id": row["id"],
                "question_stem": row["question_stem"],
                "choices": list(row["choices"]["text"]),
                "labels": labels,
                "answer_key": row["answerKey"],
                "answer_index": labels.index(row["answerKey"].lstrip()),
            }
        )
    return docs


@register_task("openbookqa")
@dataclass
class OpenBookQA(ChoiceTask):
    """``accuracy`` and ``accuracy_norm`` (per-character) over the 4 options of each test question; the
    context is the question stem alone, with no "Question:" template (lm-eval's ``doc_to_text:
    question_stem``). Chance is 1/4. Each document's ``label`` is its ``answer_index``."""

    files: ClassVar[dict[str, str]] = {"test": "openbookqa/openbookqa_test.jsonl"}
    hub = HubSource("allenai/openbookqa", "main", {"test": "test"}, openbookqa_rows)
    required_fields = ("question_stem", "choices", "answer_index")

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        return [{**row, "label": row["answer_index"]} for row in super().documents(rows, origin)]

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        return [LoglikelihoodRequest(doc["question_stem"], f" {choice}") for choice in doc["choices"]]
