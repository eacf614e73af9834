"""A study's results: tables, CSV and JSON computed once from the stored cells."""

from __future__ import annotations

import csv
import functools
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from avss.evaluation.runner import EvalResult
from avss.evaluation.uncertainty import Bootstrap
from avss.io import atomic_write_json, atomic_write_text
from avss.provenance import Provenance
from avss.pruning.select import Selection
from avss.study import analysis
from avss.study.cells import Cell, base_on
from avss.study.config import ONESHOT, StudyConfig

# results.json. Version 3 carries the provenance at the top level, where versions 1 and 2 had an
# ``environment`` (versions, avss_version, model); cells and config.json are unchanged.
STUDY_FORMAT = "avss-study/3"


@dataclass
class StudyResult:
    """A study's cells and selections; its tables are computed once from the cells' stored evaluations."""

    config: StudyConfig
    base: Cell
    cells: list[Cell]
    selections: dict[str, Selection]
    num_layers: int
    wall_time_s: float
    provenance: Provenance
    complete: bool = True
    evaluations: dict[str, EvalResult] = field(default_factory=dict, repr=False)

    def cell_infos(self) -> list[analysis.CellInfo]:
        """The pruned cells whose evaluation is stored (a study from before per-example records has none)."""
        return [
            analysis.CellInfo(
                c.method, c.mode, c.fraction, c.removed, c.evaluated_key, c.reused_from, self.base_key(c)
            )
            for c in self.cells
            if c.evaluated_key in self.evaluations
        ]

    def base_key(self, cell: Cell) -> str:
        """The unpruned model a cell is compared with: the one evaluated on the processor that evaluated the
        cell (``base@<processor>``, filed by a study resumed there) when the study holds it, since
        reduced-precision kernels differ between CPUs; else the stored base."""
        evaluated = next((c for c in self.cells if c.key == cell.evaluated_key), cell)
        if evaluated.processor is None or evaluated.processor == self.base.processor:
            return "base"
        key = base_on(evaluated.processor)
        return key if key in self.evaluations else "base"

    @functools.cached_property
    def tables(self) -> dict[str, Any]:
        """Rows, base table, null bands, headline, method against the best and variant against its plain
        twin; bootstrap: ``config.resamples``, ``config.seed``."""
        bootstrap = Bootstrap(self.config.resamples, self.config.seed)
        if "base" not in self.evaluations:
            return {
                "rows": [],
                "base": [],
                "null_bands": [],
                "headline": [],
                "versus_best": [],
                "variants": [],
            }
        cells = self.cell_infos()
        rows = analysis.comparison_rows(cells, self.evaluations, bootstrap)
        base = analysis.base_table(self.evaluations["base"], bootstrap)
        included = [
            (e["task"], e["metric"])
            for e in base
            if e.get("included") and e["metric"] == analysis.HEADLINE_METRIC
        ]
        retention = analysis.MacroRetention(self.evaluations, included, bootstrap)
        macro = analysis.headline(cells, retention)
        return {
            "rows": rows,
            "base": base,
            "null_bands": analysis.null_bands(rows),
            "headline": macro,
            "versus_best": analysis.versus_best(cells, self.evaluations, macro, bootstrap),
            "variants": analysis.variant_effects(cells, retention),
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per pruned cell and task metric, compared with the unpruned model
        (:mod:`avss.study.analysis`)."""
        return self.tables["rows"]

    def correlations(self) -> dict[str, Any]:
        """Spearman and Kendall rank correlations between the methods' one-shot layer scores, and of each
        method with the layer index (is a method a depth order in disguise?)."""
        scores = {
            selection.method: selection.steps[0].scores.numpy()
            for name, selection in self.selections.items()
            if name.endswith(f"__{ONESHOT}") and selection.steps and not analysis.is_random(selection.method)
        }
        correlations = rank_correlations(scores)
        depth = np.arange(self.num_layers, dtype=np.float64)
        correlations["with_layer_index"] = {
            method: float(scipy_stats.spearmanr(values, depth).statistic) for method, values in scores.items()
        }
        return correlations

    def to_dict(self) -> dict[str, Any]:
        tables = self.tables
        return {
            **self.provenance.to_dict(),
            "complete": self.complete,
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "wall_time_s": self.wall_time_s,
            "cell_seconds": {cell.key: cell.seconds for cell in [self.base, *self.cells]},
            "base": tables["base"],
            "headline": tables["headline"],
            "null_bands": tables["null_bands"],
            "versus_best": tables["versus_best"],
            "variants": tables["variants"],
            "rows": tables["rows"],
            "selections": {name: s.to_dict() for name, s in self.selections.items()},
            "correlations": self.correlations(),
        }

    def write(self, out: Path) -> None:
        from avss import plots

        tables = self.tables
        atomic_write_json(out / "results.json", self.to_dict())
        atomic_write_text(out / "results.csv", rows_to_csv(tables["rows"]))
        summary = analysis.summary_markdown(
            tables["rows"],
            self.config.fractions,
            tables["base"],
            tables["null_bands"],
            tables["headline"],
            tables["versus_best"],
            tables["variants"],
        )
        atomic_write_text(out / "summary.md", summary)
        if tables["rows"]:
            plots.retention_vs_fraction(tables["rows"], tables["null_bands"], out / "retention.png")
        plots.removed_layers(self.removal_matrix(), self.num_layers, out / "removed_layers.png")
        correlations = self.correlations()
        if len(correlations["methods"]) > 1:
            plots.correlation_heatmap(correlations, out / "correlations.png")

    def removal_matrix(self) -> dict[str, list[float]]:
        """Per method and mode: for each layer, the smallest fraction at which it is removed (NaN: never)."""
        matrix = {}
        for scorer in self.config.scorers():
            spec = scorer.spec
            if analysis.is_random(spec) and spec != "random[seed=0]" and spec != "random":
                continue  # one draw stands for the band
            for mode in self.config.modes_of(scorer):
                first = [math.nan] * self.num_layers
                cells = sorted(
                    (c for c in self.cells if c.method == spec and c.mode == mode), key=lambda c: c.fraction
                )
                for cell in cells:
                    for layer in cell.removed:
                        if math.isnan(first[layer]):
                            first[layer] = cell.fraction
                matrix[spec if len(self.config.modes()) == 1 else f"{spec} ({mode})"] = first
        return matrix


def rank_correlations(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Pairwise Spearman rho and Kendall tau between per-layer score vectors (NaN for a constant vector)."""
    methods = list(scores)
    spearman = np.eye(len(methods))
    kendall = np.eye(len(methods))
    for i, a in enumerate(methods):
        for j, b in enumerate(methods[:i]):
            rho = scipy_stats.spearmanr(scores[a], scores[b]).statistic
            tau = scipy_stats.kendalltau(scores[a], scores[b]).statistic
            spearman[i, j] = spearman[j, i] = rho
            kendall[i, j] = kendall[j, i] = tau
    return {"methods": methods, "spearman": spearman.tolist(), "kendall": kendall.tolist()}


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=analysis.CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
