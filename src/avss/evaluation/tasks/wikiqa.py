"""WikiQA answer-sentence selection: rank each question's candidates by log-likelihood; MAP and MRR."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import Doc, MultipleChoiceTask, register_task
from avss.evaluation.engine import Loglikelihood, LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row
from avss.evaluation.metrics import argmax, average_precision, reciprocal_rank


def wikiqa_rows(rows: Sequence[Row], split: str) -> list[Doc]:
    """``microsoft/wiki_qa`` has one row per candidate sentence (``question_id``, ``question``,
    ``document_title``, ``answer``, ``label``); group them by question, candidates in row order, into the
    shared file's one document per question. :meth:`WikiQA.documents` decides which questions are scored.
    """
    docs: dict[str, Doc] = {}
    for row in rows:
        doc = docs.setdefault(
            row["question_id"],
            {
                "id": f"wikiqa_{split}_{row['question_id']}",
                "question": row["question"],
                "document_title": row["document_title"],
                "candidates": [],
                "labels": [],
            },
        )
        doc["candidates"].append(row["answer"])
        doc["labels"].append(int(row["label"]))
    return list(docs.values())


@register_task("wikiqa")
@dataclass
class WikiQA(MultipleChoiceTask):
    """A candidate's score is its mean token log-probability as the answer to the question; the mean, not the
    sum, because candidates differ in length by tens of tokens and a sum would simply rank short ones first.

    Scored on the official filtered set (the ``-filtered.ref`` files): questions with at least one correct
    and at least one incorrect sentence, where a ranking means something.
    """

    split: str = "test"

    files: ClassVar[dict[str, str]] = {
        "test": "wikiqa/wikiqa_test_filtered.jsonl",
        "dev": "wikiqa/wikiqa_dev_filtered.jsonl",
    }
    # The hub splits hold every question; documents() keeps the same filtered set as the shared files.
    hub = HubSource("microsoft/wiki_qa", None, {"test": "test", "dev": "validation"}, wikiqa_rows)
    required_fields = ("question", "candidates", "labels")

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        return [doc for doc in super().documents(rows, origin) if 0 < sum(doc["labels"]) < len(doc["labels"])]

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        context = f"Question: {doc['question']}\nAnswer:"
        return [LoglikelihoodRequest(context, f" {candidate}") for candidate in doc["candidates"]]

    def prediction(self, doc: Doc, results: list[Loglikelihood]) -> int:
        """The candidate ranked first: highest mean token log-probability."""
        return argmax([result.logprob / result.num_tokens for result in results])

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        scores = [result.logprob / result.num_tokens for result in results]
        return {
            "map": average_precision(scores, doc["labels"]),
            "mrr": reciprocal_rank(scores, doc["labels"]),
        }
