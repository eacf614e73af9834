"""Perplexity over WikiText-2 or any text, scored in strided windows (:meth:`LanguageModel.rolling_nll`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from avss.data import bundled_text, read_text_file, read_utf8, split_paragraphs
from avss.evaluation.base import DataFile, DataRecord, Doc, Task, TaskOutput, register_task
from avss.evaluation.engine import LanguageModel
from avss.evaluation.hub import HubSource, Row, per_row
from avss.evaluation.records import ExampleRecord


@dataclass
class PerplexityTask(Task):
    """Documents are paragraphs joined by blank lines into one token stream; ``limit`` keeps the first.

    Each document's record holds its summed NLL (nats) and scored tokens, so corpus NLL per token and its
    bootstrap over documents can be recomputed from the result file. A tokenizer without character offsets
    cannot split the stream by document: then one record covers all of them (id ``<task>:all``).
    """

    max_length: int = 1024
    stride: int | None = None

    def select(self, pool: list[Doc], limit: int | None, seed: int) -> list[Doc]:
        return pool[:limit]  # contiguous text, so windows see real context

    def run(self, lm: LanguageModel, docs: list[Doc], pool: list[Doc], seed: int) -> TaskOutput:
        nll = lm.rolling_nll([doc["text"] for doc in docs], max_length=self.max_length, stride=self.stride)
        if nll.per_text:
            records = [
                ExampleRecord(id=example, nll=total, num_tokens=count)
                for example, (total, count) in zip(self.example_ids(docs, pool), nll.per_text, strict=True)
            ]
        else:
            records = [ExampleRecord(id=f"{self.name}:all", nll=nll.total, num_tokens=nll.num_tokens)]
        return TaskOutput({"perplexity": nll.perplexity}, records)


def wikitext_row(row: Row, ref: str) -> Doc:
    """A ``Salesforce/wikitext`` row is one line with its newline kept (``" = Robert Boulter = \\n"``); the
    shared file holds the same lines without it. Blank rows are dropped by :meth:`WikiText2.documents`."""
    return {"text": row["text"].removesuffix("\n")}


@register_task("wikitext2")
@dataclass
class WikiText2(PerplexityTask):
    """WikiText-2 raw test split, one document per non-blank line, as in the Hugging Face recipe
    (``"\\n\\n".join(dataset["text"])``; the shared file already dropped the blank rows)."""

    files: ClassVar[dict[str, str]] = {"test": "wikitext2/wiki.test.raw"}
    hub = HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", {"test": "test"}, per_row(wikitext_row))
    required_fields = ("text",)

    def read_docs(self, path: Path) -> list[Doc]:
        lines = read_utf8(path).splitlines()
        return self.documents([{"text": line} for line in lines], str(path))

    def documents(self, rows: list[Doc], origin: str) -> list[Doc]:
        return [row for row in super().documents(rows, origin) if row["text"].strip()]


@register_task("perplexity")
@dataclass
class TextPerplexity(PerplexityTask):
    """Any ``.txt`` (paragraphs) or ``.jsonl`` (``text`` field); by default the bundled evaluation corpus."""

    data: str | None = None

    def load(self, data_dir: Path | None, source: str = "auto") -> tuple[list[Doc], list[DataRecord]]:
        """``--data`` or the bundled corpus; neither the data directory nor the hub is involved."""
        if self.data is not None:
            return [{"text": text} for text in read_text_file(self.data)], [DataFile.of(Path(self.data))]
        text = bundled_text("evaluation")
        source = DataFile("avss.corpus:evaluation.txt", hashlib.sha256(text.encode("utf-8")).hexdigest())
        return [{"text": paragraph} for paragraph in split_paragraphs(text)], [source]
