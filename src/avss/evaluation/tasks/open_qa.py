"""Open-domain short-answer QA (NQ-open, TriviaQA): greedy answer, exact match and F1 against all aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import Doc, GenerationTask, register_task
from avss.evaluation.hub import HubSource, Row, per_row
from avss.evaluation.metrics import exact_match, token_f1


@dataclass
class OpenQATask(GenerationTask):
    """Prompts and stop strings follow lm-evaluation-harness (``Q: ...?\\nA:``): generation stops at a
    newline, period or comma, and the answer is compared after SQuAD normalization with every accepted alias.
    Few-shot examples, if any, answer with their first alias."""

    num_fewshot: int = 0

    template: ClassVar[str]
    required_fields = ("question", "answers")
    until = ("\n", ".", ",")
    max_new_tokens = 32

    def format(self, doc: Doc) -> str:
        # One question mark, whether or not the source question has one.
        return self.template.format(question=doc["question"].strip().rstrip("?"))

    def prompt(self, doc: Doc, shots: list[Doc]) -> str:
        examples = "".join(f"{self.format(shot)} {shot['answers'][0]}\n\n" for shot in shots)
        return examples + self.format(doc)

    def score(self, doc: Doc, completion: str) -> dict[str, float]:
        return {
            "exact_match": exact_match(completion, doc["answers"]),
            "f1": token_f1(completion, doc["answers"]),
        }


def nq_open_row(row: Row, ref: str) -> Doc:
    """A ``google-research-datasets/nq_open`` row: ``question`` and the ``answer`` list."""
    return {"id": f"nq_{ref}", "question": row["question"], "answers": list(row["answer"])}


def triviaqa_row(row: Row, ref: str) -> Doc:
    """A ``mandarjoshi/trivia_qa`` row: ``answer.value`` is the canonical answer; the accepted answers are
    ``answer.aliases`` in order without repeats (plus the value, should it be missing), as in the shared file.
    """
    answer = row["answer"]
    aliases = list(dict.fromkeys([*answer["aliases"], answer["value"]]))
    return {"id": f"tqa_{ref}", "question": row["question"], "answer": answer["value"], "answers": aliases}


@register_task("nq_open")
@dataclass
class NaturalQuestionsOpen(OpenQATask):
    files: ClassVar[dict[str, str]] = {"dev": "nq_open/nq_open_dev.jsonl"}
    hub = HubSource(
        "google-research-datasets/nq_open", "nq_open", {"dev": "validation"}, per_row(nq_open_row)
    )
    template = "Q: {question}?\nA:"


@register_task("triviaqa")
@dataclass
class TriviaQA(OpenQATask):
    files: ClassVar[dict[str, str]] = {"dev": "triviaqa/triviaqa_dev.jsonl"}
    # The full rc.nocontext validation split (17,944 questions); the shared file is a 3,000-question sample.
    hub = HubSource("mandarjoshi/trivia_qa", "rc.nocontext", {"dev": "validation"}, per_row(triviaqa_row))
    template = "Question: {question}?\nAnswer:"
