"""Per-example records: what a task measured on each example, saved in every ``avss-eval/2`` result file.

Averages alone cannot carry an interval or a paired test; the records can, so every number a comparison
reports (:mod:`avss.evaluation.comparison`) is computed from the result files alone.

Schema of one record (JSON object; absent keys mean "not applicable"):

``id`` (str)
    The document's ``id``, or ``<task>:<position in the task's file>`` for documents without one (plain text
    paragraphs). Two results are compared example by example through these ids.
``metrics`` (object: metric -> number)
    The example's value of each metric the task averages (``accuracy`` 0/1, ``accuracy_norm`` 0/1, ``mc2``
    probability, ``f1``, ...); the task's metric is the mean of these over records. Empty for perplexity.
``prediction`` (int or str)
    Multiple choice: the index of the option the model ranks first (raw log-likelihood unless the task
    ranks otherwise); generation: the completion.
``label`` (int)
    Index of the correct option, where the task has a single one (majority-class and longest-answer
    baselines need it).
``scores`` (list of float)
    Multiple choice: each request's summed log-likelihood (nats), in request order.
``option_lengths`` (list of int)
    The options' lengths in characters (stripped continuation text), in request order.
``num_options`` (int)
    How many of the first requests form the choice set that ``prediction`` and ``label`` index; chance is
    ``1 / num_options``. Absent for open-ended examples (chance 0).
``nll`` (float), ``num_tokens`` (int)
    Perplexity tasks: the document's summed negative log-likelihood in nats and its scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from avss.errors import DataError


@dataclass
class ExampleRecord:
    """One example's outcome; see the module docstring for the meaning of each field."""

    id: str
    metrics: dict[str, float] = field(default_factory=dict)
    prediction: int | str | None = None
    label: int | None = None
    scores: list[float] | None = None
    option_lengths: list[int] | None = None
    num_options: int | None = None
    nll: float | None = None
    num_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON, without the fields that do not apply (``None``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, item: dict[str, Any]) -> ExampleRecord:
        unknown = set(item) - {f.name for f in fields(cls)}
        if unknown or "id" not in item:
            problem = f"unknown field(s) {', '.join(sorted(unknown))}" if unknown else "no id"
            raise DataError(f"malformed example record ({problem})")
        return cls(**item)


def example_id(doc: dict[str, Any], task: str, position: int) -> str:
    """The document's own ``id``, else its position in the task's file (stable across ``--limit``)."""
    return str(doc["id"]) if "id" in doc else f"{task}:{position}"
