"""WikiQA answer-sentence selection: rank each question's candidates by log-likelihood; MAP and MRR."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from avss.evaluation.base import Doc, MultipleChoiceTask, register_task
from avss.evaluation.engine import Loglikelihood, LoglikelihoodRequest
from avss.evaluation.metrics import average_precision, reciprocal_rank


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
    required_fields = ("question", "candidates", "labels")

    def read_docs(self, path: Path) -> list[Doc]:
        return [doc for doc in super().read_docs(path) if 0 < sum(doc["labels"]) < len(doc["labels"])]

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        context = f"Question: {doc['question']}\nAnswer:"
        return [LoglikelihoodRequest(context, f" {candidate}") for candidate in doc["candidates"]]

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        scores = [result.logprob / result.num_tokens for result in results]
        return {
            "map": average_precision(scores, doc["labels"]),
            "mrr": reciprocal_rank(scores, doc["labels"]),
        }
