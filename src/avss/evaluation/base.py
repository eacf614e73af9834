"""Tasks and their registry.

A task is a small dataclass: its fields are its options (``num_fewshot``, ``stride``, ...), ``load`` reads
its documents from the data directory (or, when its file is missing there, from the hub dataset it declares in
``hub``), and ``run`` turns documents into metrics and one :class:`ExampleRecord` per document through a
:class:`LanguageModel`. Two families cover most tasks: :class:`MultipleChoiceTask` (score fixed
continuations, compare log-likelihoods) and :class:`GenerationTask` (greedy answer, compare strings); both
build the records themselves, so a task that implements only ``requests`` and ``score`` gets them for free.
Tasks register themselves by name, and ``avss eval --tasks`` only looks names up, as in lm-evaluation-harness.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from avss.data import DATA_DIR_ENV, file_sha256, read_jsonl
from avss.errors import DataError
from avss.evaluation.engine import LanguageModel, Loglikelihood, LoglikelihoodRequest
from avss.evaluation.hub import Doc, HubData, HubSource, HubUnavailableError
from avss.evaluation.metrics import argmax, length_normalized
from avss.evaluation.records import ExampleRecord, example_id
from avss.registry import class_registrar

# Where a task's documents come from: "auto" (the data directory, else the hub), "local" or "hub" only.
DATA_SOURCES = ("auto", "local", "hub")

TASKS: dict[str, type[Task]] = {}


register_task = class_registrar(TASKS, "task")


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


@dataclass(frozen=True)
class DataFile:
    """A data file a task read, recorded in results so a number can be traced to its exact input."""

    path: str
    sha256: str
    source: str = "local"

    @classmethod
    def of(cls, path: Path) -> DataFile:
        return cls(str(path), file_sha256(path))

    @property
    def digest(self) -> str:
        return self.sha256


DataRecord = DataFile | HubData


def data_record(item: dict[str, Any]) -> DataRecord:
    """A provenance entry read back from a results file (files written before hub support are local)."""
    return HubData(**item) if item.get("source") == "hub" else DataFile(**item)


@dataclass
class TaskOutput:
    """What :meth:`Task.run` measured: the task's metrics and the per-example records they average."""

    metrics: dict[str, float]
    records: list[ExampleRecord]


@dataclass
class Task(ABC):
    """One benchmark. Subclasses are dataclasses whose fields are the task's options."""

    name: ClassVar[str]
    # Relative path of each split's file inside the data directory; the first split is the default.
    files: ClassVar[dict[str, str]] = {}
    # The same benchmark on the Hugging Face hub, read when the file is missing (see avss.evaluation.hub).
    hub: ClassVar[HubSource | None] = None
    required_fields: ClassVar[tuple[str, ...]] = ()
    # Whether the task scores text with a language-modelling head (all but the encoder probes).
    needs_causal_lm: ClassVar[bool] = True

    def split_name(self) -> str:
        """The split to read: the ``split`` option of tasks that have one, else the first (only) split."""
        split = getattr(self, "split", None) or next(iter(self.files))
        if split not in self.files:
            raise DataError(f"task {self.name} has no split {split!r}; choose one of {', '.join(self.files)}")
        return split

    def load(self, data_dir: Path | None, source: str = "auto") -> tuple[list[Doc], list[DataRecord]]:
        """All documents of the task (before ``limit``) and where they came from.

        ``auto`` reads the task's file in ``data_dir`` and, only when that file is missing, the hub dataset
        the task declares; ``local`` and ``hub`` read one of the two. When nothing can be read, the
        :class:`DataError` names the file it looked for, the hub dataset it tried and why each failed.
        """
        if source not in DATA_SOURCES:
            raise DataError(f"--data-source must be one of {', '.join(DATA_SOURCES)}, not {source!r}")
        split = self.split_name()
        path = data_dir / self.files[split] if data_dir is not None else None
        if source != "hub" and path is not None and path.is_file():
            return self.read_docs(path), [DataFile.of(path)]
        hub_problem = None
        if source != "local" and self.hub is not None:
            try:
                docs, record = self.hub.load(split)
            except HubUnavailableError as exc:
                hub_problem = str(exc)
            else:
                return self.documents(docs, f"hub dataset {record.spec}"), [record]
        raise DataError(self._missing(split, path, source, hub_problem))

    def _missing(self, split: str, path: Path | None, source: str, hub_problem: str | None) -> str:
        relative = self.files[split]
        if source == "hub":
            local = "the data directory was not read (--data-source hub)"
        elif path is None:
            local = f"no data directory was found (looked for ${DATA_DIR_ENV} and ../shared/data)"
        else:
            local = f"{path} does not exist"
        local_fix = f"pass --data-dir DIR (a directory holding {relative}) or set {DATA_DIR_ENV}"
        if self.hub is None:
            hub, fix = "it has no hub dataset", local_fix
        elif source == "local":
            hub = f"hub dataset {self.hub.spec(split)} was not tried (--data-source local)"
            fix = f"{local_fix}, or use --data-source auto to fall back to the hub dataset"
        else:
            hub = f"hub dataset {self.hub.spec(split)} was not read: {hub_problem}"
            fix = (
                f"resolve the hub problem, or use --data-source auto and {local_fix}"
                if source == "hub"
                else f"{local_fix}, or resolve the hub problem"
            )
        return f"task {self.name} needs {relative}: {local}; {hub}. To provide it, {fix}"

    def read_docs(self, path: Path) -> list[Doc]:
        """The documents of a JSON-lines file in the data directory."""
        return self.documents(read_jsonl(path), str(path))

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        """Normalized rows, from a file or a hub converter, checked for the fields the task uses.

        Both sources pass through here, so a subclass that drops rows (WikiQA) drops the same ones from each.
        """
        for number, row in enumerate(rows, start=1):
            missing = [name for name in self.required_fields if name not in row]
            if missing:
                raise DataError(
                    f"{origin}: row {number} ({row.get('id', 'no id')}) lacks {', '.join(missing)}"
                )
        return rows

    def select(self, pool: list[Doc], limit: int | None, seed: int) -> list[Doc]:
        """The documents to score: all of them, or a seeded sample of ``limit`` kept in file order.

        A sample rather than the first ``limit``: several shared files are grouped by label (the first 100
        Rotten Tomatoes rows are all positive), so a prefix would measure a constant predictor.
        """
        if limit is None or limit >= len(pool):
            return pool
        return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), limit))]

    @abstractmethod
    def run(self, lm: LanguageModel, docs: list[Doc], pool: list[Doc], seed: int) -> TaskOutput:
        """Metrics and per-example records of the model on ``docs``, selected from ``pool`` (all documents,
        the few-shot source)."""

    def example_ids(self, docs: list[Doc], pool: list[Doc]) -> list[str]:
        """Each document's ``id``, else its position in ``pool`` (see :func:`example_id`)."""
        position = {id(doc): index for index, doc in enumerate(pool)}
        return [example_id(doc, self.name, position.get(id(doc), index)) for index, doc in enumerate(docs)]

    def fewshot(self, pool: list[Doc], seed: int) -> FewShotSampler:
        """Few-shot examples for tasks with a ``num_fewshot`` option; none for the others."""
        return FewShotSampler(pool, getattr(self, "num_fewshot", 0), seed)


@dataclass
class MultipleChoiceTask(Task):
    """Scores every document's (context, continuation) pairs in one batched pass; averages per-doc metrics.

    Subclasses implement ``requests`` and ``score``; the record of each document (option log-likelihoods
    and lengths, prediction, label, number of options) comes from the hooks below, whose defaults fit the
    usual "one request per option, ``doc["label"]`` is the correct index" layout.
    """

    @abstractmethod
    def requests(self, doc: Doc, shots: list[Doc]) -> list[LoglikelihoodRequest]: ...

    @abstractmethod
    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]: ...

    def prediction(self, doc: Doc, results: list[Loglikelihood]) -> int:
        """Index of the option the model ranks first: the highest summed log-likelihood."""
        return argmax([result.logprob for result in results])

    def label(self, doc: Doc) -> int | None:
        """Index of the correct option, when the document has a single one in ``label``."""
        label = doc.get("label")
        return label if isinstance(label, int) and not isinstance(label, bool) else None

    def num_options(self, doc: Doc, requests: list[LoglikelihoodRequest]) -> int | None:
        """Size of the choice set (the first requests): all of them; ``None`` for a single continuation
        (LAMBADA-style greedy match), where there is nothing to guess between."""
        return len(requests) if len(requests) > 1 else None

    def record(
        self, example: str, doc: Doc, requests: list[LoglikelihoodRequest], results: list[Loglikelihood]
    ) -> ExampleRecord:
        return ExampleRecord(
            id=example,
            metrics=self.score(doc, results),
            prediction=self.prediction(doc, results),
            label=self.label(doc),
            scores=[result.logprob for result in results],
            option_lengths=[len(request.continuation.strip()) for request in requests],
            num_options=self.num_options(doc, requests),
        )

    def run(self, lm: LanguageModel, docs: list[Doc], pool: list[Doc], seed: int) -> TaskOutput:
        sampler = self.fewshot(pool, seed)
        per_doc = [self.requests(doc, sampler.shots(doc)) for doc in docs]
        flat = lm.loglikelihood([request for requests in per_doc for request in requests])
        records, start = [], 0
        for example, doc, requests in zip(self.example_ids(docs, pool), docs, per_doc, strict=True):
            records.append(self.record(example, doc, requests, flat[start : start + len(requests)]))
            start += len(requests)
        return TaskOutput(average([record.metrics for record in records]), records)


@dataclass
class ChoiceTask(MultipleChoiceTask):
    """One request per option of ``doc["choices"]``, the gold option at ``doc["label"]``.

    ``accuracy`` compares summed log-likelihoods; ``accuracy_norm`` divides them by the option's length in
    characters first, which removes the bias towards short options (lm-evaluation-harness ``acc_norm``).
    """

    def score(self, doc: Doc, results: list[Loglikelihood]) -> dict[str, float]:
        scores, gold = [result.logprob for result in results], doc["label"]
        return {
            "accuracy": float(argmax(scores) == gold),
            "accuracy_norm": float(argmax(length_normalized(scores, doc["choices"])) == gold),
        }


@dataclass
class GenerationTask(Task):
    """Greedy-decodes an answer per document and compares it with the references."""

    until: ClassVar[tuple[str, ...]] = ("\n",)
    max_new_tokens: ClassVar[int] = 32

    @abstractmethod
    def prompt(self, doc: Doc, shots: list[Doc]) -> str: ...

    @abstractmethod
    def score(self, doc: Doc, completion: str) -> dict[str, float]: ...

    def run(self, lm: LanguageModel, docs: list[Doc], pool: list[Doc], seed: int) -> TaskOutput:
        sampler = self.fewshot(pool, seed)
        prompts = [self.prompt(doc, sampler.shots(doc)) for doc in docs]
        completions = lm.generate(prompts, until=self.until, max_new_tokens=self.max_new_tokens)
        records = [
            ExampleRecord(id=example, metrics=self.score(doc, completion), prediction=completion)
            for example, doc, completion in zip(self.example_ids(docs, pool), docs, completions, strict=True)
        ]
        return TaskOutput(average([record.metrics for record in records]), records)


class FewShotSampler:
    """Deterministic few-shot examples: ``k`` other documents of the pool, drawn with a per-document seed.

    The shared files have no training split, so shots come from the same file; a document never serves as its
    own example, and its draw depends only on the seed and its position in the file, not on ``limit``.
    """

    def __init__(self, pool: Sequence[Doc], k: int, seed: int) -> None:
        if k < 0:
            raise ValueError("num_fewshot must be >= 0")
        if k and len(pool) <= k:
            raise DataError(f"{k}-shot prompts need more than {k} documents (got {len(pool)})")
        self.pool, self.k, self.seed = pool, k, seed
        self._position = {id(doc): index for index, doc in enumerate(pool)}

    def shots(self, doc: Doc) -> list[Doc]:
        if not self.k:
            return []
        index = self._position[id(doc)]
        others = random.Random(f"{self.seed}:{index}").sample(range(len(self.pool) - 1), self.k)
        return [self.pool[i if i < index else i + 1] for i in others]


def average(per_doc: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over documents (every document reports the same metrics)."""
    if not per_doc:
        raise DataError("no documents to evaluate")
    return {name: sum(doc[name] for doc in per_doc) / len(per_doc) for name in per_doc[0]}
