"""Uncertainty of evaluation numbers: intervals, paired tests, multiple-comparison correction, baselines.

Pure functions on plain arrays (numpy, one scipy call), no model and no result files, so every formula can be
checked against a hand-computed case (``tests/test_uncertainty.py``). The per-example records of an
``avss-eval/2`` result file hold everything they need; :mod:`avss.evaluation.comparison` does the plumbing.

Why these choices:

- **Percentile bootstrap over examples** for every mean: it needs no distributional assumption, works the
  same for 0/1 accuracy, MC2 probabilities and F1, and resampling the *same* example indices for two models
  gives the paired interval of their difference, which is much narrower than two independent intervals
  because the examples' difficulty is shared. 10,000 resamples keep the Monte Carlo error of a 95% bound to
  a few percent of the interval's half-width.
- **Documents, not tokens, as the resampling unit for perplexity**: tokens of one document are correlated, so
  a token-level bootstrap would be far too narrow. Corpus NLL per token is a ratio (``sum nll / sum tokens``),
  resampled as a ratio estimator.
- **Exact McNemar** for paired 0/1 accuracy: only discordant examples carry information, and the exact
  binomial test stays valid with the handful of discordant pairs a small ``--limit`` gives.
- **Holm** controls the family-wise error over a table of comparisons without independence assumptions.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import ndtri
from scipy.stats import binomtest

from avss.errors import DataError, PairingError

RESAMPLES = 10_000
CONFIDENCE = 0.95
# Resampled indices are drawn in blocks of at most this many entries, so 10,000 resamples of 100,000
# examples never hold a 10^9-element index matrix at once.
_BLOCK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided ``confidence`` interval over ``n`` resampling units."""

    estimate: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = CONFIDENCE

    def map(self, function: Callable[[float], float]) -> Interval:
        """The interval of a monotone increasing function of the estimate (``exp`` for perplexity):
        percentile bounds are preserved by such a map, so no resampling is needed."""
        return Interval(
            function(self.estimate),
            function(self.low),
            function(self.high),
            self.n,
            self.method,
            self.confidence,
        )

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "method": self.method,
        }


# --- resampling -------------------------------------------------------------------------------------------


def _as_array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise DataError(f"{what} needs a non-empty list of per-example values")
    return array


@dataclass(frozen=True)
class Bootstrap:
    """How every interval of a table is resampled: one setting, so a table's intervals are comparable and a
    rerun with the same setting reproduces them exactly.

    ``sums`` resamples the rows of several aligned columns with the *same* row indices, which is what makes
    paired and ratio statistics paired; ``bounds`` turns resampled statistics into percentile bounds.
    """

    resamples: int = RESAMPLES
    seed: int = 0
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError("resamples must be at least 1")
        if not 0 < self.confidence < 1:
            raise ValueError("confidence must be in (0, 1)")

    def offset(self, k: int) -> Bootstrap:
        """The same setting with the seed moved by ``k``: independent draws for the k-th of several samples
        resampled on their own (tasks with different examples)."""
        return replace(self, seed=self.seed + k)

    def sums(self, columns: Sequence[np.ndarray]) -> list[np.ndarray]:
        """For each column, its sum over every bootstrap sample of the rows (the same rows in each column)."""
        n = columns[0].size
        rng = np.random.default_rng(self.seed)
        sums = [np.empty(self.resamples) for _ in columns]
        block = max(1, _BLOCK_ENTRIES // n)
        for start in range(0, self.resamples, block):
            stop = min(start + block, self.resamples)
            rows = rng.integers(0, n, size=(stop - start, n))
            for column, out in zip(columns, sums, strict=True):
                out[start:stop] = column[rows].sum(axis=1)
        return sums

    def bounds(self, statistics: np.ndarray) -> tuple[float, float]:
        """Percentile bounds of the finite resampled statistics (a resample without a defined statistic, such
        as a ratio over documents without tokens, is dropped: this conditions on a defined statistic)."""
        tail = (1 - self.confidence) / 2
        low, high = np.quantile(statistics[np.isfinite(statistics)], [tail, 1 - tail])
        return float(low), float(high)

    def interval(self, estimate: float, statistics: np.ndarray, n: int, method: str) -> Interval:
        return Interval(float(estimate), *self.bounds(statistics), n, method, self.confidence)


BOOTSTRAP = Bootstrap()


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> Interval:
    """Percentile bootstrap interval of the mean of per-example values (accuracy, MC2, F1, ...)."""
    array = _as_array(values, "a bootstrap interval")
    (sums,) = bootstrap.sums([array])
    return bootstrap.interval(array.mean(), sums / array.size, array.size, "bootstrap")


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of a Bernoulli proportion: the closed form for 0/1 accuracy.

    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps near-nominal coverage at small ``n``
    and extreme proportions; it is the reference the bootstrap is checked against.
    """
    if n < 1 or not 0 <= successes <= n:
        raise DataError(f"a Wilson interval needs 0 <= successes <= n and n >= 1 (got {successes}/{n})")
    z = float(ndtri(1 - (1 - confidence) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, "wilson", confidence)


def bootstrap_ratio(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> Interval:
    """``sum(numerators) / sum(denominators)`` with a bootstrap over the units (documents) as a ratio
    estimator: each resample draws whole documents and divides its sums, so long documents weigh as much as
    they do in the corpus figure."""
    num, den = _as_array(numerators, "a ratio"), _as_array(denominators, "a ratio")
    if num.size != den.size:
        raise DataError("a ratio needs as many numerators as denominators")
    if den.sum() <= 0:
        raise DataError("a ratio needs a positive total denominator (no scored tokens)")
    num_sums, den_sums = bootstrap.sums([num, den])
    # A resample of documents without any scored token (possible only with several empty documents) has no
    # ratio; ``bounds`` drops it.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num_sums / den_sums
    return bootstrap.interval(num.sum() / den.sum(), ratios, num.size, "bootstrap-ratio")


def nll_per_token(
    nll: Sequence[float] | np.ndarray,
    tokens: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> Interval:
    """Corpus-level NLL per token (nats) from per-document summed NLL and token counts, bootstrapped over
    documents."""
    return bootstrap_ratio(nll, tokens, bootstrap)


def perplexity_interval(
    nll: Sequence[float] | np.ndarray,
    tokens: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> Interval:
    """Perplexity ``exp(sum nll / sum tokens)``; ``exp`` is increasing, so the percentile interval of NLL per
    token maps to the perplexity's interval unchanged."""
    return nll_per_token(nll, tokens, bootstrap).map(math.exp)


# --- paired comparison ------------------------------------------------------------------------------------


def paired(
    base: Mapping[str, float], new: Mapping[str, float], what: str = "the comparison"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example values of two results as aligned arrays, matched by example id.

    Pairing is what makes the comparison sensitive, and it is only valid on the same examples: differing id
    sets (another ``--limit``, seed or split) raise :class:`PairingError` naming a few of the differences.
    """
    same_examples(base, new, what)
    ids = list(base)
    return np.asarray([base[i] for i in ids], dtype=np.float64), np.asarray(
        [new[i] for i in ids], dtype=np.float64
    )


def same_examples(base_ids: Iterable[str], new_ids: Iterable[str], what: str = "the comparison") -> None:
    """Raise :class:`PairingError` unless both sides hold the same example ids."""
    base, new = set(base_ids), set(new_ids)
    if base != new:

        def some(ids: set[str]) -> str:
            return f"{len(ids)}" + (f" (e.g. {', '.join(sorted(ids)[:3])})" if ids else "")

        raise PairingError(
            f"{what}: the two results were scored on different examples ({some(base - new)} only in the "
            f"base, {some(new - base)} only in the new result); evaluate both with the same --limit, --seed "
            "and split"
        )


def unique_ids(ids: Sequence[str], what: str) -> None:
    """Raise :class:`PairingError` when an example id repeats (pairing by id would be ambiguous)."""
    repeated = sorted(i for i, count in collections.Counter(ids).items() if count > 1)
    if repeated:
        raise PairingError(f"{what}: example ids repeat ({repeated[:3]}), so examples cannot be paired")


def paired_difference(
    base: Sequence[float] | np.ndarray,
    new: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> Interval:
    """``mean(new) - mean(base)`` over the same examples (aligned arrays), with a paired bootstrap: both
    means are taken over the same resampled examples."""
    b, n = _as_array(base, "a paired difference"), _as_array(new, "a paired difference")
    if b.size != n.size:
        raise PairingError("a paired difference needs the same number of examples on both sides")
    interval = bootstrap_mean(n - b, bootstrap)
    return replace(interval, method="paired-bootstrap")


def paired_ratio_difference(
    base_numerators: Sequence[float] | np.ndarray,
    base_denominators: Sequence[float] | np.ndarray,
    new_numerators: Sequence[float] | np.ndarray,
    new_denominators: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> Interval:
    """Difference of two ratio estimators over the same documents (aligned arrays): for perplexity tasks,
    the change in NLL per token (nats), ``new - base``, with both ratios taken on the same resampled
    documents."""
    columns = [
        _as_array(values, "a paired ratio difference")
        for values in (base_numerators, base_denominators, new_numerators, new_denominators)
    ]
    if len({column.size for column in columns}) != 1:
        raise PairingError("a paired ratio difference needs the same documents on both sides")
    if columns[1].sum() <= 0 or columns[3].sum() <= 0:
        raise DataError("a ratio needs a positive total denominator (no scored tokens)")
    bn, bd, nn, nd = bootstrap.sums(columns)
    with np.errstate(divide="ignore", invalid="ignore"):
        differences = nn / nd - bn / bd
    estimate = columns[2].sum() / columns[3].sum() - columns[0].sum() / columns[1].sum()
    return bootstrap.interval(estimate, differences, columns[0].size, "paired-bootstrap-ratio")


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``base_only`` examples right only for the base, ``new_only`` right only for the
    new model; under the null hypothesis each discordant example is a fair coin."""

    base_only: int
    new_only: int
    p_value: float


def mcnemar(base: Sequence[float] | np.ndarray, new: Sequence[float] | np.ndarray) -> McNemar:
    """Two-sided exact McNemar test on paired 0/1 outcomes (aligned arrays): a binomial test of the
    discordant pairs against p = 1/2. With no discordant pair the models agree everywhere and p = 1."""
    b, n = _as_array(base, "McNemar's test"), _as_array(new, "McNemar's test")
    if b.size != n.size:
        raise PairingError("McNemar's test needs the same examples on both sides")
    if not (np.isin(b, (0.0, 1.0)).all() and np.isin(n, (0.0, 1.0)).all()):
        raise DataError("McNemar's test needs 0/1 outcomes")
    base_only = int(np.sum((b == 1) & (n == 0)))
    new_only = int(np.sum((b == 0) & (n == 1)))
    discordant = base_only + new_only
    p = 1.0 if discordant == 0 else float(binomtest(base_only, discordant, 0.5).pvalue)
    return McNemar(base_only, new_only, p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order.

    The i-th smallest of m p-values is multiplied by ``m - i`` (i from 0), adjusted values are made monotone
    with a running maximum and capped at 1; rejecting where the adjusted value is below alpha controls the
    family-wise error rate at alpha. NaN entries (no test) stay NaN and do not count towards m.
    """
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    present = np.flatnonzero(~np.isnan(values))
    order = present[np.argsort(values[present], kind="stable")]
    m = order.size
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()


# --- chance, retention, trivial predictors -----------------------------------------------------------------


def chance_level(num_options: Sequence[int | None]) -> float:
    """Expected accuracy of a uniform random guess: the mean over examples of ``1 / num_options``.

    ``None`` marks an open-ended example (generated answers), whose chance of a match is taken as 0.
    """
    if not num_options:
        raise DataError("chance needs at least one example")
    return float(np.mean([0.0 if k is None else 1.0 / k for k in num_options]))


def retention(base: float, new: float, chance: float) -> float:
    """Chance-normalized retention ``(new - chance) / (base - chance)``: 1 keeps all of the base model's
    skill above guessing, 0 is guessing. NaN when the base is not above chance (nothing to retain)."""
    if base - chance <= 0:
        return math.nan
    return (new - chance) / (base - chance)


def retention_interval(
    base: Sequence[float] | np.ndarray,
    new: Sequence[float] | np.ndarray,
    chance: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> Interval:
    """Chance-normalized retention with a paired bootstrap: the base and new accuracies and the chance level
    (per example, ``1 / num_options``) are all taken over the same resampled examples.

    Resamples where the base is not above chance have no retention and are dropped; if the base itself is
    not above chance, every field is NaN.
    """
    b, n, c = (_as_array(values, "retention") for values in (base, new, chance))
    estimate = retention(float(b.mean()), float(n.mean()), float(c.mean()))
    if math.isnan(estimate):
        return Interval(math.nan, math.nan, math.nan, b.size, "paired-bootstrap", bootstrap.confidence)
    return bootstrap.interval(estimate, retention_draws(b, n, c, bootstrap), b.size, "paired-bootstrap")


def retention_draws(
    base: Sequence[float] | np.ndarray,
    new: Sequence[float] | np.ndarray,
    chance: Sequence[float] | np.ndarray,
    bootstrap: Bootstrap = BOOTSTRAP,
) -> np.ndarray:
    """Bootstrap draws of chance-normalized retention over the same resampled examples (NaN where a
    resample's base is not above chance): the distribution behind :func:`retention_interval`, and what a
    macro average over tasks with different examples resamples task by task."""
    columns = [_as_array(values, "retention") for values in (base, new, chance)]
    if len({column.size for column in columns}) != 1:
        raise PairingError("retention needs the same examples on both sides")
    bs, ns, cs = bootstrap.sums(columns)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bs > cs, (ns - cs) / (bs - cs), np.nan)


def majority_class_accuracy(labels: Sequence[int]) -> float:
    """Accuracy of always answering the most frequent label of these examples.

    The majority is taken on the evaluated examples themselves, which flatters the trivial predictor; for the
    inclusion rule that is the conservative direction.
    """
    if not labels:
        raise DataError("a majority-class baseline needs labelled examples")
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / len(labels))


def longest_answer_accuracy(option_lengths: Sequence[Sequence[int]], labels: Sequence[int]) -> float:
    """Accuracy of always picking the longest option (ties: the first), a known multiple-choice shortcut:
    correct answers are often the most qualified, hence longest, option."""
    if not labels or len(option_lengths) != len(labels):
        raise DataError("a longest-answer baseline needs the options' lengths and the label of every example")
    picks = [int(np.argmax(lengths)) for lengths in option_lengths]
    return float(np.mean([pick == label for pick, label in zip(picks, labels, strict=True)]))


@dataclass(frozen=True)
class Inclusion:
    """Whether a task enters a headline table, and why (or why not)."""

    included: bool
    reason: str


def inclusion(low: float, chance: float, trivial: Mapping[str, float] | None = None) -> Inclusion:
    """The headline-table rule: a task counts only if the base model's lower 95% bound is above chance and
    above the best trivial predictor (``trivial``: name -> accuracy, e.g. majority class, longest answer).

    A task the base model cannot do tells nothing about what pruning removed: any pruned score is "retained".
    """
    if not low > chance:
        return Inclusion(False, f"base lower 95% bound {low:.4f} is not above chance {chance:.4f}")
    if trivial:
        name, best = max(trivial.items(), key=lambda item: item[1])
        if not low > best:
            return Inclusion(
                False, f"base lower 95% bound {low:.4f} is not above the {name} baseline {best:.4f}"
            )
        return Inclusion(
            True,
            f"base lower 95% bound {low:.4f} is above chance {chance:.4f} and the {name} baseline {best:.4f}",
        )
    return Inclusion(
        True, f"base lower 95% bound {low:.4f} is above chance {chance:.4f} (no trivial baseline)"
    )


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    """True when every per-example value is 0 or 1 (accuracy-like metrics, for McNemar and retention)."""
    array = np.asarray(values, dtype=np.float64)
    return bool(array.size) and bool(np.isin(array, (0.0, 1.0)).all())
