"""Binary sentiment (SST-2, Rotten Tomatoes): label-word log-likelihoods for LMs, probes for encoders."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from avss.errors import DataError
from avss.evaluation.base import Doc, MultipleChoiceTask, TaskOutput, average, register_task
from avss.evaluation.engine import LanguageModel, Loglikelihood, LoglikelihoodRequest, is_causal_lm
from avss.evaluation.hub import HubSource, Row, per_row
from avss.evaluation.metrics import argmax
from avss.evaluation.records import ExampleRecord

METHODS = ("auto", "prompt", "probe")


@dataclass
class SentimentTask(MultipleChoiceTask):
    """``method="prompt"`` compares the log-likelihoods of " negative" and " positive" after the GLUE prompt
    of lm-evaluation-harness (``num_fewshot`` solved examples first) and reports ``accuracy``.

    ``method="probe"`` fits a logistic regression on mean-pooled final hidden states of one part of the
    documents (a seeded shuffle, ``probe_train_fraction`` of them) and reports ``probe_accuracy`` on the rest:
    an encoder has no head to prompt, and the probe measures what its representations still encode. Only the
    held-out documents get records (their predicted label, 0/1 ``probe_accuracy``).
    ``auto`` prompts causal LMs and probes everything else.
    """

    num_fewshot: int = 0
    method: str = "auto"
    probe_train_fraction: float = 0.5

    label_words: ClassVar[tuple[str, str]] = ("negative", "positive")
    required_fields = ("text", "label")
    needs_causal_lm = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DataError(f"{self.name}: method must be one of {', '.join(METHODS)}, not {self.method!r}")

    def format(self, doc: Doc) -> str:
        return f"{doc['text']}\nQuestion: Is this sentence positive or negative?\nAnswer:"

    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]:
        examples = "".join(f"{self.format(shot)} {self.label_words[shot['label']]}\n\n" for shot in shots)
        context = examples + self.format(doc)
        return [LoglikelihoodRequest(context, f" {word}") for word in self.label_words]

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        return {"accuracy": float(argmax([result.logprob for result in results]) == doc["label"])}

    def run(self, lm: LanguageModel, docs: list[Doc], pool: list[Doc], seed: int) -> TaskOutput:
        method = self.method
        if method == "auto":
            method = "prompt" if is_causal_lm(lm.model) else "probe"
        if method == "prompt":
            return super().run(lm, docs, pool, seed)
        ids = self.example_ids(docs, pool)
        records = [
            ExampleRecord(
                id=ids[index],
                metrics={"probe_accuracy": float(predicted == docs[index]["label"])},
                prediction=predicted,
                label=docs[index]["label"],
                num_options=len(self.label_words),
            )
            for index, predicted in self.probe(lm, docs, seed).items()
        ]
        return TaskOutput(average([record.metrics for record in records]), records)

    def probe(self, lm: LanguageModel, docs: list[Doc], seed: int) -> dict[int, int]:
        """The probe's predicted label of each held-out document, by its index in ``docs``."""
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        cut = int(len(order) * self.probe_train_fraction)
        train, test = order[:cut], order[cut:]
        labels = [doc["label"] for doc in docs]
        if not test or len({labels[i] for i in train}) < 2:
            raise DataError(
                f"{self.name}: the probe needs both labels among its {len(train)} training documents and at "
                f"least one test document; raise --limit (now {len(docs)} documents)"
            )
        features = lm.embed([doc["text"] for doc in docs])
        # Imported here: scikit-learn costs about a second at start-up, and only this probe needs it.
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        classifier.fit(features[train], [labels[i] for i in train])
        predicted = classifier.predict(features[test]).tolist()
        return {index: int(label) for index, label in sorted(zip(test, predicted, strict=True))}


def sst2_row(row: Row, ref: str) -> Doc:
    """A ``stanfordnlp/sst2`` row (``idx``, ``sentence``, ``label`` 0/1). GLUE's sentences are lowercased and
    end with a space; the space is stripped, the case cannot be restored (the shared file keeps the original
    case)."""
    return {"id": f"sst2_{ref}", "text": row["sentence"].strip(), "label": int(row["label"])}


def rotten_tomatoes_row(row: Row, ref: str) -> Doc:
    """A ``cornell-movie-review-data/rotten_tomatoes`` row: ``text``, ``label`` (0 negative, 1 positive)."""
    return {"id": f"rt_{ref}", "text": row["text"], "label": int(row["label"])}


@register_task("sst2")
@dataclass
class SST2(SentimentTask):
    files: ClassVar[dict[str, str]] = {"dev": "sst2/sst2_dev.jsonl"}
    hub = HubSource("stanfordnlp/sst2", None, {"dev": "validation"}, per_row(sst2_row))


@register_task("rotten_tomatoes")
@dataclass
class RottenTomatoes(SentimentTask):
    files: ClassVar[dict[str, str]] = {"test": "rotten_tomatoes/rotten_tomatoes_test.jsonl"}
    hub = HubSource(
        "cornell-movie-review-data/rotten_tomatoes", None, {"test": "test"}, per_row(rotten_tomatoes_row)
    )
