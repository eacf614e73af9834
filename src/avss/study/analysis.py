"""The study's tables, computed from the per-example records its cells saved.

Every pruned cell is compared with the unpruned model on the same examples, as evaluated on the cell's own
processor when the study holds it (``CellInfo.base_key``; reduced-precision kernels differ between CPUs)
(:meth:`avss.evaluation.runner.EvalResult.compare`): both scores with 95% intervals, the paired difference,
McNemar's exact test for accuracies, chance-normalized retention ``(pruned - chance) / (base - chance)`` for
accuracies and the change of NLL per token (nats) for perplexity, never a ratio averaged with accuracies.
McNemar p-values are Holm-corrected within each table (one task metric, every method, mode and budget).

Two summaries answer the study's question:

- the **null band** of the random order: the median and the 5-95% range over its seeded draws of each
  statistic, at each budget, instead of one lucky or unlucky draw;
- the **headline** table: the macro average of chance-normalized retention over the accuracy tasks whose base
  score clears the inclusion rule (lower 95% bound above chance and above the best trivial predictor), with
  a bootstrap interval that resamples every task's examples independently. Excluded tasks are listed with the
  reason.

Beside them, each variant (protected, iterative, patched, healed) is set against its plain twin at the same
budget as a paired difference of macro retention: what the variant itself buys.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avss.errors import PairingError
from avss.evaluation import uncertainty as u
from avss.evaluation.comparison import ComparisonRow, chance_per_example, metric_values
from avss.evaluation.runner import EvalResult
from avss.study.config import ITERATIVE, ONESHOT

RANDOM_PREFIX = "random"
BAND = (5.0, 50.0, 95.0)  # percentiles of the null band: low, median, high
ALPHA = 0.05  # family-wise level of the significance marks (Holm)
HEADLINE_METRIC = "accuracy"  # one metric per task in the macro average (acc_norm would count a task twice)

CSV_COLUMNS = (
    "method",
    "mode",
    "fraction",
    "n_removed",
    "removed_layers",
    "task",
    "metric",
    "kind",
    "n",
    "value",
    "value_low",
    "value_high",
    "base_value",
    "base_low",
    "base_high",
    "base_key",
    "difference",
    "difference_low",
    "difference_high",
    "difference_unit",
    "mcnemar_p",
    "holm_p",
    "chance",
    "retention",
    "retention_low",
    "retention_high",
    "included",
    "reused_from",
)


def is_random(method: str) -> bool:
    """Seeded draws of the random order (``random``, ``random[seed=3]``) form the null band."""
    return method == RANDOM_PREFIX or method.startswith(f"{RANDOM_PREFIX}[")


@dataclass
class CellInfo:
    """What the tables need of a cell: its identity, the key of the evaluation it uses and the key of the
    unpruned model's evaluation it is compared with (``base``, or ``base@<processor>`` for a cell evaluated on
    another processor than the stored base)."""

    method: str
    mode: str
    fraction: float
    removed: list[int]
    evaluated_key: str
    reused_from: str | None
    base_key: str = "base"


def _interval_fields(prefix: str, value: u.Interval | float | None) -> dict[str, Any]:
    if isinstance(value, u.Interval):
        return {prefix: value.estimate, f"{prefix}_low": value.low, f"{prefix}_high": value.high}
    return {prefix: value, f"{prefix}_low": None, f"{prefix}_high": None}


def row_fields(cell: CellInfo, comparison: ComparisonRow) -> dict[str, Any]:
    """One CSV/JSON row: the cell's identity and its comparison with the base on one task metric."""
    base = _interval_fields("base", comparison.base)
    return {
        "method": cell.method,
        "mode": cell.mode,
        "fraction": cell.fraction,
        "n_removed": len(cell.removed),
        "removed_layers": " ".join(map(str, cell.removed)),
        "task": comparison.task,
        "metric": comparison.metric,
        "kind": comparison.kind,
        "n": comparison.n,
        **_interval_fields("value", comparison.new),
        "base_value": base["base"],
        "base_low": base["base_low"],
        "base_high": base["base_high"],
        "base_key": cell.base_key,
        **_interval_fields("difference", comparison.difference),
        "difference_unit": comparison.difference_unit,
        "mcnemar_p": comparison.mcnemar.p_value if comparison.mcnemar else None,
        "holm_p": None,
        "chance": comparison.chance,
        **_interval_fields("retention", comparison.retention),
        "included": comparison.included,
        "reused_from": cell.reused_from or "",
    }


def comparison_rows(
    cells: Sequence[CellInfo], evaluations: dict[str, EvalResult], bootstrap: u.Bootstrap
) -> list[dict[str, Any]]:
    """Every cell against its base (``evaluations[cell.base_key]``), Holm-corrected within each task metric.

    Cells that reuse another cell's evaluation share its comparison (computed once per evaluated model).
    """
    computed: dict[tuple[str, str], list[ComparisonRow]] = {}
    rows = []
    for cell in cells:
        pair = (cell.evaluated_key, cell.base_key)
        if pair not in computed:
            pruned, base = (evaluations[key] for key in pair)
            computed[pair] = pruned.compare(base, bootstrap).rows
        rows += [row_fields(cell, comparison) for comparison in computed[pair]]
    holm_within_tables(rows)
    return rows


def holm_within_tables(rows: list[dict[str, Any]]) -> None:
    """Fill ``holm_p``: Holm over every McNemar p-value of one task metric (one summary table)."""
    families: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["mcnemar_p"] is not None:
            families[(row["task"], row["metric"])].append(row)
    for family in families.values():
        for row, adjusted in zip(family, u.holm([row["mcnemar_p"] for row in family]), strict=True):
            row["holm_p"] = adjusted


def statistic(row: dict[str, Any]) -> float | None:
    """The number a summary table shows for a row: retention for accuracies, the difference otherwise."""
    return row["retention"] if row["kind"] == "accuracy" else row["difference"]


def null_bands(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode, budget and task metric: percentiles of :func:`statistic` over the random order's draws."""
    groups: dict[tuple[str, float, str, str], list[float]] = defaultdict(list)
    for row in rows:
        value = statistic(row)
        if is_random(row["method"]) and value is not None and not math.isnan(value):
            groups[(row["mode"], row["fraction"], row["task"], row["metric"])].append(value)
    bands = []
    for (mode, fraction, task, metric), values in groups.items():
        low, median, high = np.percentile(values, BAND).tolist()
        bands.append(
            {
                "mode": mode,
                "fraction": fraction,
                "task": task,
                "metric": metric,
                "draws": len(values),
                "low": low,
                "median": median,
                "high": high,
                "percentiles": list(BAND),
            }
        )
    return bands


def base_table(base: EvalResult, bootstrap: u.Bootstrap) -> list[dict[str, Any]]:
    """The unpruned model per task metric: score with interval, chance, trivial baselines, inclusion."""
    table = []
    for task, result in base.tasks.items():
        if not result.records:
            continue
        for metric in result.metrics:
            entry: dict[str, Any] = {"task": task, "metric": metric}
            entry.update(result.interval(metric, bootstrap).to_dict())
            values = list(metric_values(result.records, metric).values()) if metric != "perplexity" else []
            if values and u.is_binary(values):
                decision = result.inclusion(metric, bootstrap)
                entry.update(
                    chance=float(chance_per_example(result.records).mean()),
                    trivial=result.baselines(),
                    included=decision.included,
                    reason=decision.reason,
                )
            table.append(entry)
    return table


@dataclass
class MacroRetention:
    """Macro chance-normalized retention over the ``included`` (task, metric) pairs, with its bootstrap
    draws, for any cell; computed once per (evaluation, base) pair, since the headline and the variant table
    ask for the same cells.

    Tasks hold different examples, so task ``i`` is resampled on its own with ``bootstrap.offset(i)``, over
    the base's examples in one fixed order: the macro interval is the percentile interval of the mean of the
    tasks' draws, and two cells' draws come from the same resamples, so their difference is a paired
    bootstrap of the difference (:func:`variant_effects`).
    """

    evaluations: dict[str, EvalResult]
    included: Sequence[tuple[str, str]]
    bootstrap: u.Bootstrap
    _cache: dict[tuple[str, str], tuple[float, np.ndarray]] = field(default_factory=dict, repr=False)

    def of(self, cell: CellInfo) -> tuple[float, np.ndarray]:
        """The cell's macro retention and its bootstrap draws."""
        key = (cell.evaluated_key, cell.base_key)
        if key not in self._cache:
            self._cache[key] = self._compute(cell)
        return self._cache[key]

    def _compute(self, cell: CellInfo) -> tuple[float, np.ndarray]:
        base, evaluation = self.evaluations[cell.base_key], self.evaluations[cell.evaluated_key]
        draws, estimates = [], []
        for offset, (task, metric) in enumerate(self.included):
            b_values = metric_values(base.tasks[task].records, metric)
            new_values = metric_values(evaluation.tasks[task].records, metric)
            b, n = u.paired(b_values, new_values, f"task {task}")
            by_id = {record.id: record for record in base.tasks[task].records}
            chance = chance_per_example([by_id[i] for i in b_values])
            estimates.append(u.retention(float(b.mean()), float(n.mean()), float(chance.mean())))
            draws.append(u.retention_draws(b, n, chance, self.bootstrap.offset(offset)))
        return float(np.mean(estimates)), np.mean(np.vstack(draws), axis=0)


def headline(cells: Sequence[CellInfo], retention: MacroRetention) -> list[dict[str, Any]]:
    """Macro chance-normalized retention with its 95% interval for every cell."""
    if not retention.included:
        return []
    out = []
    for cell in cells:
        estimate, draws = retention.of(cell)
        low, high = retention.bootstrap.bounds(draws)
        out.append(
            {
                "method": cell.method,
                "mode": cell.mode,
                "fraction": cell.fraction,
                "tasks": [f"{task}:{metric}" for task, metric in retention.included],
                "retention": estimate,
                "retention_low": low,
                "retention_high": high,
            }
        )
    return out


def _ids(evaluation: EvalResult, task: str) -> list[str]:
    return [record.id for record in evaluation.tasks[task].records]


def _check_same_order(
    evaluations: dict[str, EvalResult], a: str, b: str, included: Sequence[tuple[str, str]]
) -> None:
    for task, _ in included:
        if _ids(evaluations[a], task) != _ids(evaluations[b], task):
            raise PairingError(f"{a} and {b} order {task}'s examples differently")


def plain_mode(mode: str) -> str | None:
    """The mode a variant changes one thing of: ``oneshot+protect+patch`` -> ``oneshot+protect``,
    ``oneshot+patch`` -> ``oneshot``, ``iterative`` -> ``oneshot``; None for a mode with no such twin."""
    if "+" in mode:
        return mode.rsplit("+", 1)[0]
    return ONESHOT if mode == ITERATIVE else None


def variant_effects(cells: Sequence[CellInfo], retention: MacroRetention) -> list[dict[str, Any]]:
    """What protecting, iterating, patching or healing changes: each cell minus its method's cell of the
    :func:`plain_mode` at the same budget, as macro retention (same examples, same resamples: a paired
    bootstrap). Twins that evaluate the same model are left out (their difference is 0 by construction).
    Two cells compared with different bases (processors) differ also by the processors' kernels: such a row
    names both (``base_key``, ``plain_base_key``)."""
    if not retention.included:
        return []
    by_key = {(c.method, c.mode, c.fraction): c for c in cells}
    rows = []
    for cell in cells:
        plain = by_key.get((cell.method, plain_mode(cell.mode), cell.fraction))
        if plain is None or plain.evaluated_key == cell.evaluated_key:
            continue
        if cell.base_key != plain.base_key:  # the draws pair examples by position in each base's order
            _check_same_order(retention.evaluations, cell.base_key, plain.base_key, retention.included)
        estimate, draws = retention.of(cell)
        plain_estimate, plain_draws = retention.of(plain)
        low, high = retention.bootstrap.bounds(draws - plain_draws)
        rows.append(
            {
                "method": cell.method,
                "mode": cell.mode,
                "plain_mode": plain.mode,
                "fraction": cell.fraction,
                "removed_layers": cell.removed,
                "plain_removed_layers": plain.removed,
                "difference": estimate - plain_estimate,
                "difference_low": low,
                "difference_high": high,
                "base_key": cell.base_key,
                "plain_base_key": plain.base_key,
            }
        )
    return rows


def versus_best(
    cells: Sequence[CellInfo],
    evaluations: dict[str, EvalResult],
    macro: Sequence[dict[str, Any]],
    bootstrap: u.Bootstrap,
) -> list[dict[str, Any]]:
    """Method against method on the same examples: at each mode and budget, every other non-random cell
    minus the cell with the highest macro retention, per task metric (paired difference, McNemar, Holm over
    all of these comparisons). Two cells evaluated on different processors differ also by the processors'
    kernels: such a row names both bases (``base_key``, ``reference_base_key``)."""
    rows: list[dict[str, Any]] = []
    by_key = {(c.method, c.mode, c.fraction): c for c in cells}
    for mode, fraction in dict.fromkeys((entry["mode"], entry["fraction"]) for entry in macro):
        group = [
            e for e in macro if (e["mode"], e["fraction"]) == (mode, fraction) and not is_random(e["method"])
        ]
        if len(group) < 2:
            continue
        best = by_key[(max(group, key=lambda e: e["retention"])["method"], mode, fraction)]
        for entry in group:
            other = by_key[(entry["method"], mode, fraction)]
            if other.evaluated_key == best.evaluated_key:
                continue
            table = evaluations[other.evaluated_key].compare(evaluations[best.evaluated_key], bootstrap)
            for comparison in table.rows:
                row = row_fields(other, comparison)
                rows.append({**row, "reference": best.method, "reference_base_key": best.base_key})
    holm_within_tables(rows)
    return rows


def load_evaluations(out: Path, keys: Iterable[str]) -> dict[str, EvalResult]:
    """The stored evaluation of each key that has one (cells of studies before records have none)."""
    found = {}
    for key in set(keys):
        for path in (out / "cells" / f"{key}.eval.json.gz", out / "cells" / f"{key}.eval.json"):
            if path.is_file():
                found[key] = EvalResult.load(path)
                break
    return found


# --- markdown ---------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def interval_text(estimate: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    return f"{fmt(estimate, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def summary_markdown(
    rows: Sequence[dict[str, Any]],
    fractions: Sequence[float],
    base: Sequence[dict[str, Any]],
    bands: Sequence[dict[str, Any]],
    macro: Sequence[dict[str, Any]],
    versus: Sequence[dict[str, Any]] = (),
    variants: Sequence[dict[str, Any]] = (),
) -> str:
    """The study's tables: base scores and inclusion, the headline, then one table per task metric."""
    budgets = [f for f in fractions if f > 0]
    lines = ["## Base model", "", "| task | metric | value [95% CI] | n | chance | best trivial | headline |"]
    lines.append("|---|---|---|---|---|---|---|")
    for entry in base:
        trivial = entry.get("trivial") or {}
        best = max(trivial.items(), key=lambda item: item[1]) if trivial else None
        verdict = (
            "n/a" if "included" not in entry else ("yes" if entry["included"] else "no: " + entry["reason"])
        )
        lines.append(
            f"| {entry['task']} | {entry['metric']} | "
            f"{interval_text(entry['estimate'], entry['low'], entry['high'])} | {entry['n']} | "
            f"{fmt(entry.get('chance'))} | {f'{best[0]} {best[1]:.3f}' if best else 'n/a'} | {verdict} |"
        )
    lines.append("")
    lines += bases_markdown(rows)
    if macro:
        lines += headline_markdown(macro, budgets)
    if variants:
        lines += variants_markdown(variants)
    if versus:
        lines += versus_markdown(versus)
    lines += [
        "Cells: chance-normalized retention [95% CI] for accuracies, change of the metric (perplexity:",
        "NLL in nats per token) [95% CI] otherwise, pruned minus base on the same examples; `*` marks a",
        f"Holm-corrected McNemar p < {ALPHA} within the table. Random: median [5%, 95%] over its draws",
        "(one draw: that draw's own interval).",
        "",
    ]
    for task, metric in dict.fromkeys((row["task"], row["metric"]) for row in rows):
        selected = [row for row in rows if (row["task"], row["metric"]) == (task, metric)]
        kind = selected[0]["kind"]
        what = "retention" if kind == "accuracy" else f"change ({selected[0]['difference_unit']})"
        lines += [f"### {task} {metric}: {what}", ""]
        lines.append("| method | mode | " + " | ".join(f"{f:g}" for f in budgets) + " |")
        lines.append("|---|---|" + "---|" * len(budgets))
        for method, mode in dict.fromkeys(
            (row["method"], row["mode"]) for row in selected if not is_random(row["method"])
        ):
            cells = {
                row["fraction"]: row for row in selected if (row["method"], row["mode"]) == (method, mode)
            }
            lines.append(
                f"| {method} | {mode} | " + " | ".join(cell_text(cells.get(f)) for f in budgets) + " |"
            )
        for mode in dict.fromkeys(band["mode"] for band in bands):
            found = {
                band["fraction"]: band
                for band in bands
                if (band["task"], band["metric"], band["mode"]) == (task, metric, mode)
            }
            if not found:
                continue
            counts = {band["draws"] for band in found.values()}
            if counts == {1}:  # one draw is no band: its own interval, as any method's
                draws = {
                    row["fraction"]: row
                    for row in selected
                    if is_random(row["method"]) and row["mode"] == mode
                }
                texts = [cell_text(draws.get(f)) for f in budgets]
            else:
                texts = [
                    band_text(band) + (f" ({band['draws']} draws)" if band and len(counts) > 1 else "")
                    for band in (found.get(f) for f in budgets)
                ]
            lines.append(f"| random ({draws_label(counts)}) | {mode} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)


def bases_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Which cells are compared with an unpruned model evaluated on another processor (none: no lines)."""
    counts: dict[str, set[tuple[str, str, float]]] = defaultdict(set)
    for row in rows:
        counts[row["base_key"]].add((row["method"], row["mode"], row["fraction"]))
    others = {key: len(cells) for key, cells in sorted(counts.items()) if key != "base"}
    if not others:
        return []
    named = "; ".join(f"`{key}`: {n} cells" for key, n in others.items())
    return [
        "Cells evaluated on another processor than the base model above are compared with the unpruned model",
        f"evaluated on their own processor ({named}; `cells/<key>.eval.json.gz`), so that the kernels'",
        "difference is no part of any comparison with the unpruned model.",
        "",
    ]


def headline_markdown(macro: Sequence[dict[str, Any]], budgets: Sequence[float]) -> list[str]:
    tasks = ", ".join(macro[0]["tasks"])
    lines = [
        "## Headline: macro chance-normalized retention over the included accuracy tasks",
        "",
        f"Tasks: {tasks}. 1 keeps all of the base model's skill above chance, 0 is guessing.",
        "",
        "| method | mode | " + " | ".join(f"{f:g}" for f in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    randoms: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for method, mode in dict.fromkeys((entry["method"], entry["mode"]) for entry in macro):
        entries = {e["fraction"]: e for e in macro if (e["method"], e["mode"]) == (method, mode)}
        if is_random(method):
            for fraction, entry in entries.items():
                randoms[(mode, fraction)].append(entry)
            continue
        lines.append(
            f"| {method} | {mode} | " + " | ".join(macro_text(entries.get(f)) for f in budgets) + " |"
        )
    for mode in dict.fromkeys(mode for mode, _ in randoms):
        counts = {len(v) for (m, _), v in randoms.items() if m == mode}
        texts = []
        for fraction in budgets:
            draws = randoms.get((mode, fraction))
            if not draws:
                texts.append("")
            elif counts == {1}:  # one draw is no band: its own interval, as any method's
                texts.append(macro_text(draws[0]))
            else:
                low, median, high = np.percentile([e["retention"] for e in draws], BAND).tolist()
                # A band of a grown study may rest on fewer draws at some budgets: say so in the cell.
                suffix = f" ({len(draws)} draws)" if len(counts) > 1 else ""
                texts.append(interval_text(median, low, high) + suffix)
        lines.append(f"| random ({draws_label(counts)}) | {mode} | " + " | ".join(texts) + " |")
    lines.append("")
    return lines


def macro_text(entry: dict[str, Any] | None) -> str:
    return (
        ""
        if entry is None
        else interval_text(entry["retention"], entry["retention_low"], entry["retention_high"])
    )


def draws_label(counts: set[int]) -> str:
    """The random row's label: its number of draws, or a pointer to the cells where budgets differ."""
    if counts == {1}:
        return "one draw"
    return f"{max(counts)} draws" if len(counts) == 1 else "draws in each cell"


def variants_markdown(variants: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "## What each variant changes: macro retention minus its plain twin's, same examples",
        "",
        "Paired bootstrap over the same resamples of every task; `†`: the two cells were compared with",
        "unpruned models evaluated on different processors, so the difference includes the kernels'.",
        "",
        "| method | mode | against | budget | removed (twin's) | difference [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for row in variants:
        mark = " †" if row["base_key"] != row["plain_base_key"] else ""
        removed = ", ".join(map(str, row["removed_layers"]))
        if row["removed_layers"] != row["plain_removed_layers"]:
            removed += " (" + ", ".join(map(str, row["plain_removed_layers"])) + ")"
        lines.append(
            f"| {row['method']} | {row['mode']} | {row['plain_mode']} | {row['fraction']:g} | {removed} | "
            f"{interval_text(row['difference'], row['difference_low'], row['difference_high'])}{mark} |"
        )
    return [*lines, ""]


def versus_markdown(versus: Sequence[dict[str, Any]]) -> list[str]:
    """Each method against the best one, per task metric: the paired difference (accuracy points, or NLL
    nats per token) and the Holm-corrected McNemar p-value."""
    lines = [
        "## Against the best method (highest macro retention at each mode and budget), same examples",
        "",
        "| method | mode | budget | best method | task | metric | difference [95% CI] | Holm p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mixed = False
    for row in versus:
        holm = "n/a" if row["holm_p"] is None else f"{row['holm_p']:.2g}"
        difference = interval_text(row["difference"], row["difference_low"], row["difference_high"])
        if row["base_key"] != row["reference_base_key"]:
            difference += " †"
            mixed = True
        lines.append(
            f"| {row['method']} | {row['mode']} | {row['fraction']:g} | {row['reference']} | {row['task']} | "
            f"{row['metric']} | {difference} | {holm} |"
        )
    if mixed:
        lines += ["", "† The two cells ran on different processors: the difference includes their kernels'."]
    return [*lines, ""]


def cell_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    prefix = "retention" if row["kind"] == "accuracy" else "difference"
    text = interval_text(row[prefix], row[f"{prefix}_low"], row[f"{prefix}_high"])
    if row["holm_p"] is not None and row["holm_p"] < ALPHA:
        text += "*"
    return text


def band_text(band: dict[str, Any] | None) -> str:
    return "" if band is None else interval_text(band["median"], band["low"], band["high"])
