"""WinoGrande (XL dev): partial scoring, as lm-evaluation-harness ``winogrande`` does.

Each option replaces the blank and ends its own context; the part of the sentence after the blank, shared by
both, is the continuation scored. The option whose context makes that continuation likelier wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.errors import DataError
from avss.evaluation.base import Doc, MultipleChoiceTask, register_task
from avss.evaluation.engine import Loglikelihood, LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row, per_row
from avss.evaluation.metrics import argmax

ANSWER_INDEX = {"1": 0, "2": 1}  # lm-eval's doc_to_text: the gold option's index


def winogrande_row(row: Row, ref: str) -> Doc:
    """An ``allenai/winogrande`` ``winogrande_xl`` row (``sentence``, ``option1``, ``option2``, ``answer``
    "1"/"2"). The hub has no question id, so its documents lack the shared file's ``qid``."""
    return {
        "id": f"winogrande_{ref}",
        "sentence": row["sentence"],
        "option1": row["option1"],
        "option2": row["option2"],
        "answer": row["answer"],
    }


def partial_requests(sentence: str, options: list[str]) -> list[LoglikelihoodRequest]:
    """lm-eval's ``preprocess_winogrande``: context ``sentence[:blank] + option``, continuation
    ``" " + sentence[blank + 1:].strip()`` (its target delimiter and ``doc_to_target``)."""
    blank = sentence.index("_")
    continuation = " " + sentence[blank + 1 :].strip()
    return [LoglikelihoodRequest(sentence[:blank] + option, continuation) for option in options]


@register_task("winogrande")
@dataclass
class WinoGrande(MultipleChoiceTask):
    """``accuracy``: the gold option (``answer`` "1" or "2") gives the shared continuation the higher summed
    log-likelihood. ``choices`` is ``[option1, option2]`` (chance 1/2) and ``label`` the gold index. lm-eval
    reports no ``acc_norm`` here."""

    files: ClassVar[dict[str, str]] = {"dev": "winogrande/winogrande_dev.jsonl"}
    hub = HubSource("allenai/winogrande", "winogrande_xl", {"dev": "validation"}, per_row(winogrande_row))
    required_fields = ("sentence", "option1", "option2", "answer")

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        docs = super().documents(rows, origin)
        for number, row in enumerate(docs, start=1):
            if "_" not in row["sentence"]:
                raise DataError(f"{origin}: row {number} ({row.get('id', 'no id')}) has no blank '_'")
        return [
            {**row, "choices": [row["option1"], row["option2"]], "label": ANSWER_INDEX[row["answer"]]}
            for row in docs
        ]

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        return partial_requests(doc["sentence"], doc["choices"])

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        return {"accuracy": float(argmax([result.logprob for result in results]) == doc["label"])}
