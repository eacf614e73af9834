"""The comparison study: every method x every budget, pruned and evaluated on the same data.

For each method and each fraction the base model is copied in memory, the method's layers are removed and
the copy is evaluated with :func:`avss.evaluation.evaluate`. Selections come from one shared scoring context
(one statistics pass for every hook-based method); with ``iterative`` each activation-based method is also run
iteratively once to the largest budget, whose removal order yields every smaller budget.

Every finished cell is written atomically to ``cells/`` and skipped on a rerun, so an interrupted study loses
at most the cell in progress. Two cells that remove the same layers are the same model, so the second reuses
the first one's metrics (recorded as ``reused_from``).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from avss import __version__
from avss.adapters import get_adapter
from avss.data import TextSource
from avss.errors import OutputError, PruneConfigError
from avss.evaluation import evaluate, get_task
from avss.evaluation.metrics import retained_ratio
from avss.heal import HealConfig, get_heal_method, heal_in_memory
from avss.io import atomic_write_json, atomic_write_text, to_json
from avss.iterative import Selection, select_iteratively, select_oneshot
from avss.models import LoadedModel, load_model
from avss.pipeline import CalibrationOptions, package_versions
from avss.prune import remove_layers
from avss.scorers import Scorer, context_for, get_scorer

DEFAULT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5)
DEFAULT_TASKS = ("wikitext2", "truthfulqa_mc", "sst2")
ONESHOT, ITERATIVE = "oneshot", "iterative"
HEALED = "+healed"  # mode suffix of a cell whose pruned model was healed before evaluation
CSV_COLUMNS = (
    "method",
    "mode",
    "fraction",
    "n_removed",
    "removed_layers",
    "task",
    "metric",
    "value",
    "base_value",
    "retained_pct",
    "reused_from",
)


@dataclass
class StudyConfig:
    """Everything that defines a study; a rerun into the same folder must use the same config."""

    model: str
    methods: list[str]
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    limits: dict[str, int | None] = field(default_factory=dict)
    iterative: bool = False
    calibration: CalibrationOptions = field(default_factory=lambda: CalibrationOptions(samples=32))
    calibration_data: TextSource = field(default_factory=TextSource)
    task_options: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 16
    data_dir: str | None = None
    seed: int = 0
    heal: str | None = None
    heal_steps: int = 32

    def __post_init__(self) -> None:
        if not self.methods:
            raise PruneConfigError("give at least one method")
        self.scorers()  # validate names and options before any model is loaded
        if self.heal is not None:
            get_heal_method(self.heal)
        for task in self.tasks:
            get_task(task)
        bad = [f for f in self.fractions if not 0 <= f < 1]
        if bad:
            raise PruneConfigError(f"fractions must be in [0, 1), got {bad}")
        self.fractions = sorted(set(self.fractions))

    def scorers(self) -> list[Scorer]:
        return [get_scorer(method) for method in self.methods]

    def modes(self) -> list[str]:
        return [ONESHOT, ITERATIVE] if self.iterative else [ONESHOT]

    def cell_modes(self) -> list[str]:
        """Modes of evaluated cells: every pruning mode, and with ``heal`` its healed twin."""
        modes = self.modes()
        return modes + [mode + HEALED for mode in modes] if self.heal else modes

    def to_dict(self) -> dict[str, Any]:
        return json.loads(to_json(asdict(self)))


def parse_limits(text: str | None, tasks: Sequence[str]) -> dict[str, int | None]:
    """``"100"`` (every task) or ``"wikitext2=40,sst2=200"`` (per task; unnamed tasks are not limited)."""
    if not text:
        return {task: None for task in tasks}
    if "=" not in text:
        return {task: int(text) for task in tasks}
    limits: dict[str, int | None] = {task: None for task in tasks}
    for item in text.split(","):
        task, _, value = item.partition("=")
        if task.strip() not in limits:
            raise PruneConfigError(
                f"--limit names {task.strip()!r}, which is not among the tasks {list(tasks)}"
            )
        limits[task.strip()] = int(value)
    return limits


def slug(text: str) -> str:
    """A file-name-safe form of a method spec (``avss[site=delta]`` -> ``avss-site-delta``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def budget(fraction: float, num_layers: int) -> int:
    return round(fraction * num_layers)


@dataclass
class Cell:
    """One evaluated model: a method's selection at one budget (``base`` for the unpruned model)."""

    method: str
    mode: str
    fraction: float
    removed: list[int]
    metrics: dict[str, dict[str, float]]
    seconds: float
    reused_from: str | None = None

    @property
    def key(self) -> str:
        return "base" if self.method == "base" else f"{slug(self.method)}__{self.mode}__{self.fraction:g}"


class Study:
    """Runs a :class:`StudyConfig` into an output folder, resuming whatever an earlier run finished."""

    def __init__(
        self,
        config: StudyConfig,
        out: str | Path,
        loaded: LoadedModel | None = None,
        progress: bool = True,
        log: Callable[[str], None] = lambda message: None,
    ):
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.log = log
        self._loaded = loaded
        self.cells: dict[str, Cell] = {}
        self.selections: dict[str, Selection] = {}

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.config.model)
        return self._loaded

    # --- folder ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the folder, or check that the study already in it is this one (resume)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "cells").mkdir(exist_ok=True)
        (self.out / "selections").mkdir(exist_ok=True)
        path = self.out / "config.json"
        wanted = self.config.to_dict()
        if path.exists():
            found = json.loads(path.read_text(encoding="utf-8"))
            if found != wanted:
                changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                raise OutputError(
                    f"{self.out} holds a different study (differs in {', '.join(changed)}); "
                    "choose another --out or delete it"
                )
        else:
            atomic_write_json(path, wanted)
        for file in sorted((self.out / "cells").glob("*.json")):
            cell = Cell(**json.loads(file.read_text(encoding="utf-8")))
            self.cells[cell.key] = cell

    # --- selections -----------------------------------------------------------------------------------

    def select(self) -> None:
        """Every method's selection (one shared context for one-shot; one run per method for iterative)."""
        config = self.config
        model = self.loaded.model
        batches = list(config.calibration.batches(self.loaded.tokenizer, config.calibration_data))
        scorers = config.scorers()
        num_layers = get_adapter(model).num_layers
        largest = budget(max(config.fractions), num_layers)
        if largest == 0:
            return
        shared = None
        for scorer in scorers:
            for mode in config.modes():
                name = f"{slug(scorer.spec)}__{mode}"
                path = self.out / "selections" / f"{name}.json"
                if path.exists():
                    self.selections[name] = selection_from_dict(json.loads(path.read_text(encoding="utf-8")))
                    continue
                started = time.perf_counter()
                if mode == ONESHOT or not scorer.uses_activations:
                    if shared is None:
                        shared = context_for(model, batches, scorers, cached=True, progress=self.progress)
                    selection = oneshot_order(scorer, shared, config.fractions, num_layers)
                    selection.iterative = mode == ITERATIVE
                else:
                    self.log(f"iterative selection: {scorer.spec} (removing {largest} of {num_layers})")
                    context = context_for(copy.deepcopy(model), batches, [scorer], progress=self.progress)
                    selection = select_iteratively(scorer, context, largest)
                    del context
                record = {**selection.to_dict(), "seconds": round(time.perf_counter() - started, 3)}
                atomic_write_json(path, record)
                self.selections[name] = selection

    # --- cells ----------------------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str, float, list[int]]]:
        """(method, mode, fraction, removed layers) of every pruned cell, in run order.

        Budget-major order: every method at the smallest budget first, so a study cut short still compares
        all methods at the budgets it reached.
        """
        num_layers = self.num_layers
        cells = []
        for fraction in self.config.fractions:
            n = budget(fraction, num_layers)
            if n == 0:
                continue
            for scorer in self.config.scorers():
                for mode in self.config.modes():
                    removed = self.selections[f"{slug(scorer.spec)}__{mode}"].removed_for(n)
                    cells.append((scorer.spec, mode, fraction, removed))
                    if self.config.heal:
                        cells.append((scorer.spec, mode + HEALED, fraction, removed))
        return cells

    def evaluate_model(self, model: Any) -> dict[str, dict[str, float]]:
        config = self.config
        metrics = {}
        for task in config.tasks:
            accepted = {f.name for f in fields(get_task(task))}
            options = {k: v for k, v in config.task_options.items() if k in accepted}
            result = evaluate(
                model,
                self.loaded.tokenizer,
                [task],
                limit=config.limits.get(task),
                batch_size=config.eval_batch_size,
                data_dir=config.data_dir,
                seed=config.seed,
                **options,
            )
            metrics.update(result.metrics)
        return metrics

    def run_cell(self, method: str, mode: str, fraction: float, removed: list[int]) -> Cell:
        healed = mode.endswith(HEALED)
        by_layers = {
            (tuple(cell.removed), cell.mode.endswith(HEALED)): cell
            for cell in self.cells.values()
            if cell.reused_from is None
        }
        cell = Cell(method, mode, fraction, removed, {}, 0.0)
        if cell.key in self.cells:
            return self.cells[cell.key]
        twin = by_layers.get((tuple(removed), healed))
        if twin is not None:
            cell.metrics, cell.reused_from = twin.metrics, twin.key
        else:
            self.log(f"evaluating {cell.key}: removing {removed}")
            started = time.perf_counter()
            model = self.loaded.model
            if removed:
                model = copy.deepcopy(model)
                remove_layers(model, removed)
            if healed:
                model = self.heal(model, removed)
            cell.metrics = self.evaluate_model(model)
            cell.seconds = round(time.perf_counter() - started, 3)
            del model
        atomic_write_json(self.out / "cells" / f"{cell.key}.json", asdict(cell))
        self.cells[cell.key] = cell
        return cell

    def heal(self, model: Any, removed: list[int]) -> Any:
        """Heal a pruned copy with the same budget for every method (``avss study --heal``)."""
        config = self.config
        result = heal_in_memory(
            model,
            self.loaded.tokenizer,
            removed,
            config.calibration_data.load(),
            HealConfig(method=config.heal or "lora", steps=config.heal_steps, seed=config.seed),
            teacher=self.loaded.model,
            progress=self.progress,
        )
        return result.model

    # --- whole study ----------------------------------------------------------------------------------

    def run(self) -> StudyResult:
        started = time.perf_counter()
        self.prepare()
        self.run_cell("base", ONESHOT, 0.0, [])
        self.select()
        for method, mode, fraction, removed in self.plan():
            self.run_cell(method, mode, fraction, removed)
        return self.report(started)

    def report(self, started: float | None = None) -> StudyResult:
        """Write the results of every finished cell; without a model when called alone (a study cut short).

        ``complete`` in ``results.json`` says whether every planned cell was there.
        """
        started = time.perf_counter() if started is None else started
        if not self.cells:
            self.prepare()
        self.load_selections()
        planned = [Cell(*spec, {}, 0.0).key for spec in self.plan()]
        result = StudyResult(
            config=self.config,
            base=self.cells["base"],
            cells=[self.cells[key] for key in planned if key in self.cells],
            selections=self.selections,
            num_layers=self.num_layers,
            wall_time_s=round(time.perf_counter() - started, 3),
            environment={
                "versions": package_versions(),
                "avss_version": __version__,
                "model": self._loaded.source if self._loaded else {"name": self.config.model},
            },
            complete=all(key in self.cells for key in planned),
        )
        result.write(self.out)
        return result

    def load_selections(self) -> None:
        for path in sorted((self.out / "selections").glob("*.json")):
            self.selections.setdefault(
                path.stem, selection_from_dict(json.loads(path.read_text(encoding="utf-8")))
            )

    @property
    def num_layers(self) -> int:
        """Depth of the unpruned model, read from a stored selection when there is one (no model load)."""
        for selection in self.selections.values():
            if selection.steps:
                return selection.steps[0].num_layers
        return get_adapter(self.loaded.model).num_layers


def oneshot_order(scorer: Scorer, context: Any, fractions: Sequence[float], num_layers: int) -> Selection:
    """A one-shot selection for every budget; ``order`` lists layers by ascending score.

    Scorers with their own selection rule (angular picks a contiguous span per budget) get one selection per
    budget, stored in ``by_budget``.
    """
    largest = max(budget(f, num_layers) for f in fractions)
    first = select_oneshot(scorer, context, largest)
    importance = first.steps[0]
    selection = Selection(scorer.spec, False, list(importance.ranking()), [importance])
    for fraction in fractions:
        n = budget(fraction, num_layers)
        if n:
            selection.by_budget[n] = scorer.select(importance, n, set())
    return selection


def selection_from_dict(raw: dict[str, Any]) -> Selection:
    from avss.scorers import LayerImportance

    steps = [
        LayerImportance(
            step["method"], torch_tensor(step["scores"]), step["options"], warnings=step["warnings"]
        )
        for step in raw["steps"]
    ]
    by_budget = {int(k): v for k, v in raw.get("by_budget", {}).items()}
    return Selection(raw["method"], raw["iterative"], raw["order"], steps, by_budget)


def torch_tensor(values: list[float]) -> Any:
    import torch

    return torch.tensor(values, dtype=torch.float64)


# --- results ------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    config: StudyConfig
    base: Cell
    cells: list[Cell]
    selections: dict[str, Selection]
    num_layers: int
    wall_time_s: float
    environment: dict[str, Any]
    complete: bool = True

    def rows(self) -> list[dict[str, Any]]:
        """One row per method x mode x fraction x task metric, including the unpruned row of each method."""
        rows = []
        for method in self.config.methods:
            spec = get_scorer(method).spec
            for mode in self.config.cell_modes():
                cells = [Cell(spec, mode, 0.0, [], self.base.metrics, 0.0, reused_from="base")]
                cells += [c for c in self.cells if c.method == spec and c.mode == mode]
                for cell in cells:
                    rows.extend(cell_rows(cell, self.base, self.num_layers))
        return rows

    def correlations(self) -> dict[str, Any]:
        """Spearman and Kendall rank correlations between the methods' one-shot layer scores."""
        scores = {
            selection.method: selection.steps[0].scores.numpy()
            for name, selection in self.selections.items()
            if name.endswith(f"__{ONESHOT}") and selection.steps
        }
        return rank_correlations(scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "avss-study/1",
            "complete": self.complete,
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "wall_time_s": self.wall_time_s,
            "environment": self.environment,
            "rows": self.rows(),
            "selections": {name: s.to_dict() for name, s in self.selections.items()},
            "correlations": self.correlations(),
        }

    def write(self, out: Path) -> None:
        from avss import plots

        rows = self.rows()
        atomic_write_json(out / "results.json", self.to_dict())
        atomic_write_text(out / "results.csv", rows_to_csv(rows))
        atomic_write_text(out / "summary.md", summary_markdown(rows, self.config.fractions))
        plots.retained_vs_fraction(rows, out / "retained.png")
        plots.removed_layers(self.removal_matrix(), self.num_layers, out / "removed_layers.png")
        correlations = self.correlations()
        if len(correlations["methods"]) > 1:
            plots.correlation_heatmap(correlations, out / "correlations.png")

    def removal_matrix(self) -> dict[str, list[float]]:
        """Per method and mode: for each layer, the smallest fraction at which it is removed (NaN: never)."""
        matrix = {}
        for method in self.config.methods:
            spec = get_scorer(method).spec
            for mode in self.config.modes():
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


def cell_rows(cell: Cell, base: Cell, num_layers: int) -> list[dict[str, Any]]:
    rows = []
    for task, metrics in cell.metrics.items():
        for metric, value in metrics.items():
            base_value = base.metrics[task][metric]
            rows.append(
                {
                    "method": cell.method,
                    "mode": cell.mode,
                    "fraction": cell.fraction,
                    "n_removed": len(cell.removed),
                    "removed_layers": " ".join(map(str, cell.removed)),
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "base_value": base_value,
                    "retained_pct": 100.0 * retained_ratio(metric, base_value, value),
                    "reused_from": cell.reused_from or "",
                }
            )
    return rows


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
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary_markdown(rows: list[dict[str, Any]], fractions: Sequence[float]) -> str:
    """Retained % per method (rows) and fraction (columns), one table per task metric."""
    lines = []
    metrics = list(dict.fromkeys((row["task"], row["metric"]) for row in rows))
    for task, metric in metrics:
        selected = [row for row in rows if (row["task"], row["metric"]) == (task, metric)]
        base = selected[0]["base_value"]
        lines += [f"### {task} {metric} (base {base:.4g}): retained %", ""]
        lines.append("| method | mode | " + " | ".join(f"{f:g}" for f in fractions) + " |")
        lines.append("|---|---|" + "---|" * len(fractions))
        for method, mode in dict.fromkeys((row["method"], row["mode"]) for row in selected):
            values = {
                row["fraction"]: row["retained_pct"]
                for row in selected
                if (row["method"], row["mode"]) == (method, mode)
            }
            cells = [f"{values[f]:.1f}" if f in values else "" for f in fractions]
            lines.append(f"| {method} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
