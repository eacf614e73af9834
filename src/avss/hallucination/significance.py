"""Is the EAVSS ranking real? A label-permutation null and a bootstrap of the top-k set, on per-answer sums.

A ranking can look informative by chance: EAVSS ratios of two samples differ across layers even when the
truthful/hallucinated labels mean nothing. The null answers "what would shuffled labels give": within each
question the labels of its answers are permuted (its one truthful answer becomes a random one of its
answers), EAVSS is recomputed from the per-answer sums (:class:`~avss.hallucination.answer_stats.AnswerStats`,
no model), and a ranking statistic of the real labels is placed among those of the shuffles. The p-value
counts the real labelling as one of the permutations, ``(1 + #{null >= observed}) / (1 + N)``, so it is
never 0 and is exact for any ``N``.

The bootstrap resamples questions with replacement (a question brings all its answers) and reports how often
the top-k layer set comes back: the Jaccard index of each resample's top-k to the real top-k, and each
layer's share of resamples that put it in the top-k.

Statistics (larger = a more pronounced ranking), on ``L x EAVSS~`` (1 = an average layer):

- ``topk_gap``: mean of the top-k layers minus mean of the others: how far the selected layers stand out;
- ``spread``: standard deviation over layers: how far the profile is from flat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from avss.hallucination.answer_stats import AnswerStats
from avss.scorers.stability import jaccard

RankingStatistic = Callable[[torch.Tensor, int], torch.Tensor]


def relative(eavss: torch.Tensor) -> torch.Tensor:
    """``L x EAVSS~`` per row of (P, L) EAVSS: each layer's score over the layer mean."""
    return eavss / eavss.mean(dim=-1, keepdim=True)


def topk_gap(eavss: torch.Tensor, k: int) -> torch.Tensor:
    """(P,) mean relative EAVSS of the top-k layers minus that of the other layers."""
    values = relative(eavss)
    top = values.topk(k, dim=-1).values.sum(dim=-1)
    rest = values.sum(dim=-1) - top
    return top / k - rest / (values.shape[-1] - k)


def spread(eavss: torch.Tensor, k: int) -> torch.Tensor:
    """(P,) population standard deviation of relative EAVSS over layers (``k`` unused: the whole profile)."""
    return relative(eavss).std(dim=-1, correction=0)


RANKING_STATISTICS: dict[str, RankingStatistic] = {"topk_gap": topk_gap, "spread": spread}


def top_sets(eavss: torch.Tensor, k: int) -> torch.Tensor:
    """(P, k) the k most hallucination-prone layers of each row, ties in layer order (as EavssScores.top)."""
    return torch.argsort(-eavss, dim=-1, stable=True)[:, :k]


def spearman_to(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(P,) Spearman correlation of each row of ``rows`` (P, L) with ``reference`` (L,) (average ranks)."""
    ranks = rankdata(rows.numpy(), axis=-1)
    target = rankdata(reference.numpy())
    ranks = ranks - ranks.mean(axis=-1, keepdims=True)
    target = target - target.mean()
    denominator = np.sqrt((ranks**2).sum(axis=-1) * (target**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return torch.from_numpy((ranks @ target) / denominator)


def permute_within(
    groups: torch.Tensor, labels: torch.Tensor, permutations: int, generator: torch.Generator
) -> torch.Tensor:
    """(P, R) labellings: ``labels`` (R,) shuffled independently within each group of ``groups`` (R,).

    Sorting ``group + U(0, 1)`` orders the rows group by group, randomly inside each group; the labels, in
    group order, are then written back through that order, so each group keeps its own labels (one truthful
    answer per question) in a uniformly random arrangement.
    """
    by_group = labels[torch.argsort(groups, stable=True)]
    keys = groups.to(torch.float64) + torch.rand(
        permutations, len(groups), generator=generator, dtype=torch.float64
    )
    order = torch.argsort(keys, dim=-1)
    shuffled = torch.empty(permutations, len(groups), dtype=labels.dtype)
    return shuffled.scatter_(1, order, by_group.expand(permutations, -1))


def p_value(observed: float, null: torch.Tensor) -> float:
    """``(1 + #{null >= observed}) / (1 + N)``; null values equal to ``observed`` up to rounding count."""
    tolerance = 1e-12 * max(abs(observed), 1.0)
    return (1 + int((null >= observed - tolerance).sum())) / (1 + len(null))


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)].to(torch.float64)
    if not len(finite):
        return {}
    points = torch.quantile(finite, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": float(finite.mean()), "q05": points[0], "median": points[1], "q95": points[2]}


@dataclass
class PermutationNull:
    """Where the real ranking statistic falls among ``permutations`` within-question label shuffles.

    ``null_spearman`` is each shuffle's Spearman correlation to the real EAVSS profile: a real ranking that
    shuffled labels reproduce (high correlation) comes from the layers and answers, not from which answer is
    truthful.
    """

    statistic: str
    k: int
    permutations: int
    seed: int
    observed: float
    null: torch.Tensor
    p_value: float
    null_spearman: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "k": self.k,
            "permutations": self.permutations,
            "seed": self.seed,
            "observed": self.observed,
            "p_value": self.p_value,
            "null": _quantiles(self.null),
            "null_spearman_to_real": _quantiles(self.null_spearman),
        }


def permutation_null(
    stats: AnswerStats,
    k: int,
    *,
    permutations: int = 1000,
    seed: int = 0,
    statistic: str = "topk_gap",
    chunk: int = 250,
) -> PermutationNull:
    """The label-permutation null of ranking ``statistic`` (see the module docstring) with ``k`` layers.

    Shuffles are drawn and scored ``chunk`` at a time, so memory stays at ``chunk x rows`` weights.
    """
    measure = _statistic(statistic, k, stats.num_layers)
    if permutations < 1:
        raise ValueError("permutations must be at least 1")
    real = stats.eavss_many(stats.truthful.unsqueeze(0))
    generator = torch.Generator().manual_seed(seed)
    groups = stats.groups()
    null, correlations = [], []
    for start in range(0, permutations, chunk):
        labels = permute_within(groups, stats.truthful, min(chunk, permutations - start), generator)
        shuffled = stats.eavss_many(labels)
        null.append(measure(shuffled, k))
        correlations.append(spearman_to(shuffled, real[0]))
    observed = float(measure(real, k)[0])
    values = torch.cat(null)
    return PermutationNull(
        statistic, k, permutations, seed, observed, values, p_value(observed, values), torch.cat(correlations)
    )


@dataclass
class TopkStability:
    """How often the real top-k layer set comes back when questions are resampled with replacement."""

    k: int
    resamples: int
    seed: int
    top: list[int]
    jaccard: torch.Tensor
    inclusion: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "resamples": self.resamples,
            "seed": self.seed,
            "top": self.top,
            "jaccard": _quantiles(self.jaccard),
            "inclusion": self.inclusion.tolist(),
        }


def bootstrap_topk(
    stats: AnswerStats, k: int, *, resamples: int = 1000, seed: int = 0, chunk: int = 250
) -> TopkStability:
    """Bootstrap over questions of the top-k EAVSS set: Jaccard to the real set and inclusion rates."""
    _statistic("topk_gap", k, stats.num_layers)
    top = stats.scores().top(k)
    generator = torch.Generator().manual_seed(seed)
    groups = stats.groups()
    num_questions = int(groups.max()) + 1
    labels = stats.truthful.unsqueeze(0)
    scores, counts = [], torch.zeros(stats.num_layers, dtype=torch.float64)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = torch.randint(num_questions, (size, num_questions), generator=generator)
        multiplicity = torch.zeros(size, num_questions, dtype=torch.float64)
        multiplicity.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float64))
        sets = top_sets(stats.eavss_many(labels.expand(size, -1), multiplicity[:, groups]), k)
        scores.extend(jaccard(top, row) for row in sets.tolist())
        counts += torch.bincount(sets.flatten(), minlength=stats.num_layers).to(torch.float64)
    return TopkStability(
        k, resamples, seed, top, torch.tensor(scores, dtype=torch.float64), counts / resamples
    )


def _statistic(name: str, k: int, num_layers: int) -> RankingStatistic:
    if name not in RANKING_STATISTICS:
        raise ValueError(f"unknown ranking statistic {name!r}; choose from {', '.join(RANKING_STATISTICS)}")
    if not 0 < k < num_layers:
        raise ValueError(f"k must be between 1 and {num_layers - 1} (the other layers are the comparison)")
    return RANKING_STATISTICS[name]
