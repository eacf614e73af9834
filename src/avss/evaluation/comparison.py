"""From per-example records to the numbers a reviewer accepts: intervals, paired differences, retention.

:mod:`avss.evaluation.uncertainty` holds the statistics on plain arrays; this module only turns a task's
:class:`~avss.evaluation.records.ExampleRecord` list into those arrays and assembles a comparison table of
two results. Everything here reads records, never a model, so a comparison can be recomputed from two
result files.

Accuracy metrics (``ACCURACY_METRICS``, every per-example value 0 or 1) get McNemar's test,
chance-normalized retention and the headline inclusion rule; other means (MC2, F1, MAP) get bootstrap
intervals and paired differences only; perplexity is compared as the change of corpus NLL per token in nats,
and never mixed with the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from avss.errors import DataError
from avss.evaluation import uncertainty as u
from avss.evaluation.metrics import ACCURACY_METRICS
from avss.evaluation.records import ExampleRecord

PERPLEXITY = "perplexity"


def _require(records: Sequence[ExampleRecord], what: str) -> None:
    if not records:
        raise DataError(
            f"{what} has no per-example records (written before avss-eval/2, or an lm-evaluation-harness "
            "task); re-run avss eval to get intervals"
        )


def is_perplexity(records: Sequence[ExampleRecord]) -> bool:
    return bool(records) and all(record.nll is not None for record in records)


def metric_values(records: Sequence[ExampleRecord], metric: str, what: str = "the task") -> dict[str, float]:
    """Per-example values of ``metric`` by example id (ids must not repeat)."""
    _require(records, what)
    u.unique_ids([record.id for record in records], what)
    missing = [record.id for record in records if metric not in record.metrics]
    if missing:
        raise DataError(f"{what}: {len(missing)} record(s) lack metric {metric!r} (e.g. {missing[0]})")
    return {record.id: float(record.metrics[metric]) for record in records}


def nll_columns(records: Sequence[ExampleRecord], what: str = "the task") -> dict[str, tuple[float, int]]:
    """``(summed nll, tokens)`` per document id of a perplexity task."""
    _require(records, what)
    u.unique_ids([record.id for record in records], what)
    if not is_perplexity(records):
        raise DataError(f"{what}: the records hold no per-document NLL")
    return {record.id: (float(record.nll), int(record.num_tokens or 0)) for record in records}  # type: ignore[arg-type]


def is_accuracy(metric: str, values: Sequence[float] | np.ndarray) -> bool:
    """A right-or-wrong metric: a known accuracy name whose per-example values are all 0 or 1."""
    return metric in ACCURACY_METRICS and u.is_binary(values)


def interval(
    records: Sequence[ExampleRecord],
    metric: str,
    bootstrap: u.Bootstrap = u.BOOTSTRAP,
    *,
    what: str = "the task",
) -> u.Interval:
    """95% interval of one task metric from its records: a bootstrap over examples of the mean, or for
    perplexity the ratio estimator over documents mapped through ``exp``."""
    if metric == PERPLEXITY:
        columns = np.asarray(list(nll_columns(records, what).values()), dtype=np.float64)
        return u.perplexity_interval(columns[:, 0], columns[:, 1], bootstrap)
    values = list(metric_values(records, metric, what).values())
    return u.bootstrap_mean(values, bootstrap)


def chance_per_example(records: Sequence[ExampleRecord]) -> np.ndarray:
    """``1 / num_options`` of each example (0 for open-ended ones)."""
    return np.asarray([0.0 if r.num_options is None else 1.0 / r.num_options for r in records])


def trivial_baselines(records: Sequence[ExampleRecord]) -> dict[str, float]:
    """Accuracy of the trivial predictors the records allow: majority class where every example has a
    label, and longest answer where they also record the options' lengths."""
    if not records or any(record.label is None for record in records):
        return {}
    labels = [int(record.label) for record in records]  # type: ignore[arg-type]
    baselines = {"majority class": u.majority_class_accuracy(labels)}
    if all(r.option_lengths is not None and r.num_options is not None for r in records):
        lengths = [record.option_lengths[: record.num_options] for record in records]  # type: ignore[index]
        baselines["longest answer"] = u.longest_answer_accuracy(lengths, labels)
    return baselines


def inclusion(
    records: Sequence[ExampleRecord], metric: str, bootstrap: u.Bootstrap = u.BOOTSTRAP
) -> u.Inclusion:
    """The headline-table rule for an accuracy-like ``metric`` of a base model's records."""
    values = list(metric_values(records, metric).values())
    if not is_accuracy(metric, values):
        return u.Inclusion(False, f"{metric} is not a 0/1 accuracy; the inclusion rule does not apply")
    low = u.bootstrap_mean(values, bootstrap).low
    return u.inclusion(low, u.chance_level([r.num_options for r in records]), trivial_baselines(records))


@dataclass
class ComparisonRow:
    """One task metric of a comparison; ``difference`` is new minus base (accuracy points, or nats per token
    for perplexity). Fields a metric does not support are ``None``."""

    task: str
    metric: str
    kind: str  # "accuracy" (0/1 per example), "mean" (other per-example scores) or "perplexity"
    base: u.Interval | float
    new: u.Interval | float
    n: int | None = None
    difference: u.Interval | None = None
    difference_unit: str | None = None
    mcnemar: u.McNemar | None = None
    holm_p: float | None = None
    chance: float | None = None
    retention: u.Interval | None = None
    base_nll_per_token: u.Interval | None = None
    new_nll_per_token: u.Interval | None = None
    included: bool | None = None
    inclusion_reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            if isinstance(value, u.Interval):
                value = value.to_dict()
            elif isinstance(value, u.McNemar):
                value = vars(value).copy()
            out[key] = value
        return out


def compare_task(
    task: str,
    metric: str,
    base: Sequence[ExampleRecord],
    new: Sequence[ExampleRecord],
    *,
    base_value: float,
    new_value: float,
    bootstrap: u.Bootstrap = u.BOOTSTRAP,
) -> ComparisonRow:
    """One row: both results' intervals and the paired statistics, from the two tasks' records."""
    if not base or not new:
        kind = PERPLEXITY if metric == PERPLEXITY else "mean"
        return ComparisonRow(task, metric, kind, base_value, new_value, note="no per-example records")
    if metric == PERPLEXITY and not (is_perplexity(base) and is_perplexity(new)):
        return ComparisonRow(task, metric, PERPLEXITY, base_value, new_value, note="no per-document NLL")
    what = f"task {task}"
    if metric == PERPLEXITY:
        b, n = nll_columns(base, f"{what} (base)"), nll_columns(new, what)
        u.same_examples(b, n, what)
        ids = list(b)
        bn, bt = (np.asarray([b[i][k] for i in ids], dtype=np.float64) for k in (0, 1))
        nn, nt = (np.asarray([n[i][k] for i in ids], dtype=np.float64) for k in (0, 1))
        return ComparisonRow(
            task,
            metric,
            PERPLEXITY,
            u.perplexity_interval(bn, bt, bootstrap),
            u.perplexity_interval(nn, nt, bootstrap),
            n=len(ids),
            difference=u.paired_ratio_difference(bn, bt, nn, nt, bootstrap),
            difference_unit="nats per token",
            base_nll_per_token=u.nll_per_token(bn, bt, bootstrap),
            new_nll_per_token=u.nll_per_token(nn, nt, bootstrap),
        )
    base_values = metric_values(base, metric, f"{what} (base)")
    b, n = u.paired(base_values, metric_values(new, metric, what), what)
    base_interval = u.bootstrap_mean(b, bootstrap)
    row = ComparisonRow(
        task,
        metric,
        "mean",
        base_interval,
        u.bootstrap_mean(n, bootstrap),
        n=b.size,
        difference=u.paired_difference(b, n, bootstrap),
        difference_unit=metric,
    )
    if is_accuracy(metric, b) and is_accuracy(metric, n):
        by_id = {record.id: record for record in base}
        ordered = [by_id[i] for i in base_values]
        chance = chance_per_example(ordered)
        decision = u.inclusion(base_interval.low, float(chance.mean()), trivial_baselines(ordered))
        row.kind = "accuracy"
        row.mcnemar = u.mcnemar(b, n)
        row.chance = float(chance.mean())
        row.retention = u.retention_interval(b, n, chance, bootstrap)
        row.included, row.inclusion_reason = decision.included, decision.reason
    return row


@dataclass
class Comparison:
    """A table of :class:`ComparisonRow`; McNemar p-values are Holm-corrected across the whole table."""

    rows: list[ComparisonRow]
    bootstrap: u.Bootstrap = u.BOOTSTRAP

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.bootstrap.confidence,
            "resamples": self.bootstrap.resamples,
            "seed": self.bootstrap.seed,
            "rows": [row.to_dict() for row in self.rows],
        }


def compare(
    base: Mapping[str, tuple[Mapping[str, float], Sequence[ExampleRecord]]],
    new: Mapping[str, tuple[Mapping[str, float], Sequence[ExampleRecord]]],
    bootstrap: u.Bootstrap = u.BOOTSTRAP,
) -> Comparison:
    """Compare every task and metric both results report; ``base``/``new`` map a task to its
    ``(metrics, records)``. Tasks only one side has are left out."""
    rows = []
    for task, (metrics, records) in new.items():
        if task not in base:
            continue
        base_metrics, base_records = base[task]
        for metric, value in metrics.items():
            if metric in base_metrics:
                rows.append(
                    compare_task(
                        task,
                        metric,
                        base_records,
                        records,
                        base_value=base_metrics[metric],
                        new_value=value,
                        bootstrap=bootstrap,
                    )
                )
    tested = [row for row in rows if row.mcnemar is not None]
    for row, p in zip(tested, u.holm([row.mcnemar.p_value for row in tested]), strict=True):  # type: ignore[union-attr]
        row.holm_p = p if not math.isnan(p) else None
    return Comparison(rows, bootstrap)
