"""Does a method's choice of layers survive another calibration set?

A layer-importance method is only useful if the layers it removes are a property of the model, not of the
few thousand calibration tokens it saw. :func:`calibration_stability` scores the model once per calibration
set (disjoint parts of one text, or different texts), selects at each budget, and reports per method:

- the **Jaccard overlap** ``|A ∩ B| / |A ∪ B|`` of the selected blocks for every pair of sets (1: the same
  blocks every time), its mean and minimum;
- the **spread of the scores**: per block, the coefficient of variation of its score across sets, averaged
  over blocks, and the mean Spearman correlation of the score vectors between sets.

Methods that do not look at activations (random, first, last) are skipped: their selection cannot change.
All hook-based methods share one statistics pass per set (:func:`avss.scorers.context_for`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from avss.adapters import get_adapter
from avss.data import CalibrationOptions, TextSource
from avss.errors import OptionError
from avss.models import LoadedModel
from avss.scorers import context_for, get_scorer
from avss.scorers.base import Scorer


@dataclass(frozen=True)
class CalibrationSet:
    """One calibration set: a text source and how it is cut (``calibration.part`` picks a disjoint block)."""

    name: str
    source: TextSource
    calibration: CalibrationOptions


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two selections (1.0 for two empty ones)."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def pairwise(values: Sequence[Any], measure: Any) -> list[float]:
    return [float(measure(a, b)) for a, b in itertools.combinations(values, 2)]


@dataclass
class MethodStability:
    """One method's selections and scores on every set, and their agreement."""

    method: str
    scores: dict[str, list[float]]
    selections: dict[int, dict[str, list[int]]]  # budget -> set name -> removed blocks
    jaccard: dict[int, dict[str, float]] = field(default_factory=dict)  # budget -> mean / min
    score_cv: float = float("nan")
    score_spearman: float = float("nan")

    def summarize(self) -> MethodStability:
        for n, by_set in self.selections.items():
            overlaps = pairwise(list(by_set.values()), jaccard)
            self.jaccard[n] = {"mean": float(np.mean(overlaps)), "min": float(np.min(overlaps))}
        matrix = np.asarray(list(self.scores.values()), dtype=np.float64)  # sets x blocks
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = matrix.std(axis=0) / np.abs(matrix.mean(axis=0))
        self.score_cv = float(np.nanmean(cv))
        rhos = pairwise(list(matrix), lambda a, b: scipy_stats.spearmanr(a, b).statistic)
        self.score_spearman = float(np.nanmean(rhos))
        return self


@dataclass
class StabilityResult:
    model: dict[str, Any]
    sets: list[dict[str, Any]]
    budgets: list[int]
    methods: list[MethodStability]
    format: str = "avss-stability/1"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        budgets = " | ".join(f"Jaccard @{n} mean (min)" for n in self.budgets)
        lines = [
            f"| method | {budgets} | score CV across sets | Spearman between sets |",
            "|---|" + "---|" * (len(self.budgets) + 2),
        ]
        for method in self.methods:
            overlaps = " | ".join(
                f"{method.jaccard[n]['mean']:.2f} ({method.jaccard[n]['min']:.2f})" for n in self.budgets
            )
            lines.append(
                f"| {method.method} | {overlaps} | {method.score_cv:.3f} | {method.score_spearman:.3f} |"
            )
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SetScores:
    """One calibration set's scores and selections: what a long run keeps per set, so that it resumes by
    set (leave-one-out on five sets is over an hour on a CPU)."""

    set: dict[str, Any]  # name, source, calibration options, tokens
    scores: dict[str, list[float]]  # method -> score per block
    selections: dict[int, dict[str, list[int]]]  # budget -> method -> removed blocks
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SetScores:
        """Inverse of :meth:`to_dict` after a JSON round trip (which turns the budgets into strings)."""
        selections = {int(n): by_method for n, by_method in record["selections"].items()}
        return cls(record["set"], record["scores"], selections, record["seconds"])

    def covers(self, described: dict[str, Any], methods: Sequence[str], budgets: Sequence[int]) -> bool:
        """Whether this record answers for the set ``described`` with every method and budget."""
        same_set = {k: v for k, v in self.set.items() if k != "tokens"} == described
        return same_set and set(methods) <= set(self.scores) and set(budgets) <= set(self.selections)


def describe_set(calibration_set: CalibrationSet) -> dict[str, Any]:
    return {
        "name": calibration_set.name,
        "source": calibration_set.source.describe(),
        "calibration": asdict(calibration_set.calibration),
    }


def score_set(
    loaded: LoadedModel,
    scorers: Sequence[Scorer],
    calibration_set: CalibrationSet,
    budgets: Sequence[int],
    progress: bool = False,
) -> SetScores:
    """Score ``loaded.model`` with every scorer on one set (one shared pass) and select at each budget."""
    started = time.perf_counter()
    batches = calibration_set.calibration.batches(loaded.tokenizer, calibration_set.source)
    context = context_for(loaded.model, batches.batches, scorers, cached=True, progress=progress)
    scores: dict[str, list[float]] = {}
    selections: dict[int, dict[str, list[int]]] = {n: {} for n in budgets}
    for scorer in scorers:
        importance = scorer.score(context)
        scores[scorer.spec] = importance.scores.tolist()
        for n, by_method in selections.items():
            by_method[scorer.spec] = scorer.select(importance, n, set())
    described = {**describe_set(calibration_set), "tokens": batches.num_tokens}
    return SetScores(described, scores, selections, round(time.perf_counter() - started, 1))


def calibration_stability(
    loaded: LoadedModel,
    methods: Sequence[str],
    sets: Sequence[CalibrationSet],
    budgets: Sequence[int],
    progress: bool = False,
    *,
    done: Mapping[str, SetScores] | None = None,
    on_set: Callable[[SetScores], None] | None = None,
) -> StabilityResult:
    """Score ``loaded.model`` with every activation-based method on every set and compare the selections
    at each budget (blocks removed). The model is not changed.

    ``done`` holds sets scored by an earlier run, by name; one is reused only if it describes the same set
    (source, file hash, cut) and covers every method and budget, otherwise the set is scored again.
    ``on_set`` receives each newly scored set, so a caller can keep it before the next one starts."""
    if len(sets) < 2 or len({s.name for s in sets}) != len(sets):
        raise OptionError("calibration stability needs at least two calibration sets with distinct names")
    scorers = [scorer for scorer in map(get_scorer, methods) if scorer.uses_activations]
    specs = [scorer.spec for scorer in scorers]
    num_layers = get_adapter(loaded.model).num_layers
    if not budgets or not all(0 < n < num_layers for n in budgets):
        raise OptionError(f"every budget must remove between 1 and {num_layers - 1} of {num_layers} blocks")
    done = done or {}
    per_set = []
    for calibration_set in sets:
        earlier = done.get(calibration_set.name)
        if earlier is not None and earlier.covers(describe_set(calibration_set), specs, budgets):
            per_set.append(earlier)
            continue
        scored = score_set(loaded, scorers, calibration_set, budgets, progress)
        if on_set is not None:
            on_set(scored)
        per_set.append(scored)
    methods_found = [
        MethodStability(
            spec,
            {s.set["name"]: s.scores[spec] for s in per_set},
            {n: {s.set["name"]: s.selections[n][spec] for s in per_set} for n in budgets},
        ).summarize()
        for spec in specs
    ]
    return StabilityResult(
        model=loaded.source,
        sets=[{**s.set, "seconds": s.seconds} for s in per_set],
        budgets=list(budgets),
        methods=methods_found,
    )
