"""LAMBADA (OpenAI's version): predict a passage's last word (lm-evaluation-harness ``lambada_openai``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from avss.evaluation.base import Doc, MultipleChoiceTask, register_task
from avss.evaluation.engine import LanguageModel, Loglikelihood, LoglikelihoodRequest
from avss.evaluation.hub import HubSource, Row, per_row

if TYPE_CHECKING:
    from avss.evaluation.base import TaskOutput
    from avss.evaluation.records import ExampleRecord


def lambada_row(row: Row, ref: str) -> Doc:
    """An ``EleutherAI/lambada_openai`` ``default`` row: ``text``, the whole passage."""
    return {"id": f"lambada_{ref}", "text": row["text"]}


def last_word_request(text: str) -> LoglikelihoodRequest:
    """lm-eval's split at the last space: context ``" ".join(text.split(" ")[:-1])``, target
    ``" " + text.split(" ")[-1]`` (spaces only, so a word after a newline stays with its line)."""
    words = text.split(" ")
    return LoglikelihoodRequest(" ".join(words[:-1]), " " + words[-1])


@register_task("lambada_openai")
@dataclass
class LambadaOpenAI(MultipleChoiceTask):
    """One continuation per passage, its last word, and no options to choose between (chance 0).

    ``accuracy``: the fraction of passages whose last word is the model's greedy continuation, every token
    of it the argmax (lm-eval ``acc``). ``perplexity``: ``exp(-mean over passages of the word's summed
    log-likelihood)``, lm-eval's ``perplexity`` aggregation: a per-word, not a per-token, perplexity. Each
    record holds the word's NLL with ``num_tokens`` 1 (the word), so ``exp(sum nll / sum num_tokens)`` over
    records is this perplexity too.
    """

    files: ClassVar[dict[str, str]] = {"test": "lambada_openai/lambada_openai_test.jsonl"}
    hub = HubSource("EleutherAI/lambada_openai", "default", {"test": "test"}, per_row(lambada_row))
    required_fields = ("text",)

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        return [last_word_request(doc["text"])]

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        (result,) = results
        return {"accuracy": float(result.is_greedy)}

    def record(
        self, example: str, doc: Doc, requests: list[LoglikelihoodRequest], results: list[Loglikelihood]
    ) -> ExampleRecord:
        record = super().record(example, doc, requests, results)
        record.nll, record.num_tokens = -results[0].logprob, 1
        return record

    def run(self, lm: LanguageModel, docs: list[Doc], pool: list[Doc], seed: int) -> TaskOutput:
        output = super().run(lm, docs, pool, seed)
        nll = [record.nll for record in output.records if record.nll is not None]
        output.metrics["perplexity"] = math.exp(sum(nll) / len(nll))
        return output
