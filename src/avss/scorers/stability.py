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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from avss.adapters import get_adapter
from avss.data import CalibrationOptions, TextSource
from avss.errors import OptionError
from avss.models import LoadedModel
from avss.scorers import context_for, get_scorer


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


def calibration_stability(
    loaded: LoadedModel,
    methods: Sequence[str],
    sets: Sequence[CalibrationSet],
    budgets: Sequence[int],
    progress: bool = False,
) -> StabilityResult:
    """Score ``loaded.model`` with every activation-based method on every set and compare the selections
    at each budget (blocks removed). The model is not changed."""
    if len(sets) < 2 or len({s.name for s in sets}) != len(sets):
        raise OptionError("calibration stability needs at least two calibration sets with distinct names")
    scorers = [scorer for scorer in map(get_scorer, methods) if scorer.uses_activations]
    num_layers = get_adapter(loaded.model).num_layers
    found = {scorer.spec: MethodStability(scorer.spec, {}, {n: {} for n in budgets}) for scorer in scorers}
    described = []
    for calibration_set in sets:
        batches = calibration_set.calibration.batches(loaded.tokenizer, calibration_set.source)
        described.append(
            {
                "name": calibration_set.name,
                "source": calibration_set.source.describe(),
                "calibration": asdict(calibration_set.calibration),
                "tokens": batches.num_tokens,
            }
        )
        context = context_for(loaded.model, batches.batches, scorers, cached=True, progress=progress)
        for scorer in scorers:
            importance = scorer.score(context)
            record = found[scorer.spec]
            record.scores[calibration_set.name] = importance.scores.tolist()
            for n in budgets:
                if 0 < n < num_layers:
                    record.selections[n][calibration_set.name] = scorer.select(importance, n, set())
        del context
    return StabilityResult(
        model=loaded.source,
        sets=described,
        budgets=list(budgets),
        methods=[record.summarize() for record in found.values()],
    )
