"""Open-domain short-answer QA (NQ-open, TriviaQA): greedy answer, exact match and F1 against all aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.evaluation.base import Doc, GenerationTask, register_task
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


@register_task("nq_open")
@dataclass
class NaturalQuestionsOpen(OpenQATask):
    files: ClassVar[dict[str, str]] = {"dev": "nq_open/nq_open_dev.jsonl"}
    template = "Q: {question}?\nA:"


@register_task("triviaqa")
@dataclass
class TriviaQA(OpenQATask):
    files: ClassVar[dict[str, str]] = {"dev": "triviaqa/triviaqa_dev.jsonl"}
    template = "Question: {question}?\nAnswer:"
