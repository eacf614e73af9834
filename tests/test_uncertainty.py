"""Uncertainty statistics on hand-computed cases (no model): intervals, paired tests, Holm, retention."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avss.errors import AvssError, DataError
from avss.evaluation import uncertainty as u

# 120 successes in 200: p = 0.6.
BERNOULLI = np.array([1.0] * 120 + [0.0] * 80)


def test_wilson_interval_matches_the_hand_computed_formula():
    # z = 1.959964; centre = (0.6 + z^2/400) / (1 + z^2/200) = 0.598115;
    # half = z / (1 + z^2/200) * sqrt(0.6*0.4/200 + z^2/160000) = 0.067279.
    interval = u.wilson_interval(120, 200)
    assert interval.estimate == 0.6
    assert interval.low == pytest.approx(0.530837, abs=1e-6)
    assert interval.high == pytest.approx(0.665394, abs=1e-6)
    # 0 of 10: [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415], where the normal interval is [0, 0].
    none = u.wilson_interval(0, 10)
    assert none.low == 0.0 and none.high == pytest.approx(0.277533, abs=1e-6)
    assert u.wilson_interval(10, 10).high == pytest.approx(1.0)


def test_bootstrap_of_a_bernoulli_sample_is_close_to_wilson():
    boot = u.bootstrap_mean(BERNOULLI, u.Bootstrap(seed=0))
    wilson = u.wilson_interval(120, 200)
    assert boot.estimate == 0.6 and boot.n == 200 and boot.method == "bootstrap"
    # Tolerance 0.01, the sum of three terms: (1) resampled means lie on a grid of 1/n = 0.005, so a bound can
    # sit one grid step off; (2) Monte Carlo error of a 2.5% quantile with R = 10,000 resamples:
    # sqrt(0.025 * 0.975 / R) / density, density = phi(1.96) / sd = 0.0584 / 0.0346 = 1.69, so SE = 0.00093,
    # and 4 SE = 0.0037; (3) the infinite-resample bootstrap bounds are Binomial(200, 0.6) quantiles / 200,
    # 0.530 and 0.665, 0.0008 and 0.0004 from Wilson's. 0.005 + 0.0037 + 0.0008 < 0.01.
    assert boot.low == pytest.approx(wilson.low, abs=0.01)
    assert boot.high == pytest.approx(wilson.high, abs=0.01)
    # Seeded: the same seed gives the same interval.
    assert u.bootstrap_mean(BERNOULLI, u.Bootstrap(seed=0)) == boot


def test_a_constant_sample_has_a_zero_width_interval_and_bad_input_is_refused():
    interval = u.bootstrap_mean([0.25] * 7, u.Bootstrap(100))
    assert (interval.estimate, interval.low, interval.high) == (0.25, 0.25, 0.25)
    with pytest.raises(DataError):
        u.bootstrap_mean([])


def test_ratio_bootstrap_equals_the_mean_bootstrap_when_documents_are_equally_long():
    nll = np.array([12.0, 30.0, 6.0, 18.0, 24.0, 9.0])
    tokens = np.full(6, 3.0)
    ratio = u.nll_per_token(nll, tokens, u.Bootstrap(2000, seed=4))
    # With every denominator 3, sum(nll[rows]) / sum(3) = mean(nll[rows] / 3): same rows, same seed.
    mean = u.bootstrap_mean(nll / 3, u.Bootstrap(2000, seed=4))
    assert ratio.estimate == pytest.approx(99.0 / 18.0)
    assert ratio.low == pytest.approx(mean.low) and ratio.high == pytest.approx(mean.high)


def test_corpus_nll_per_token_weighs_documents_by_their_tokens():
    interval = u.nll_per_token([10.0, 20.0, 30.0], [5, 5, 10])
    assert interval.estimate == 3.0  # 60 / 20, not the mean of 2, 4, 3
    assert interval.low <= 3.0 <= interval.high
    ppl = u.perplexity_interval([10.0, 20.0, 30.0], [5, 5, 10])
    assert ppl.estimate == pytest.approx(math.exp(3.0))
    assert (ppl.low, ppl.high) == pytest.approx((math.exp(interval.low), math.exp(interval.high)))


def test_paired_difference_of_a_constant_shift_is_exact():
    base = np.array([0.2, 0.9, 0.4, 0.7])
    difference = u.paired_difference(base, base + 0.1, u.Bootstrap(500))
    assert difference.estimate == pytest.approx(0.1)
    assert difference.low == pytest.approx(0.1) and difference.high == pytest.approx(0.1)


def test_paired_nll_difference_per_token():
    nll, tokens = np.array([10.0, 20.0, 30.0]), np.array([5.0, 5.0, 10.0])
    # Half a nat more on every token: the difference is 0.5 in every resample.
    difference = u.paired_ratio_difference(nll, tokens, nll + 0.5 * tokens, tokens, u.Bootstrap(500))
    assert difference.estimate == pytest.approx(0.5)
    assert difference.low == pytest.approx(0.5) and difference.high == pytest.approx(0.5)


def test_mcnemar_on_a_known_table():
    # 2x2 table: both right 20, base only 7, new only 2, both wrong 5. Exact two-sided p on the 9 discordant
    # pairs: 2 * P(X <= 2 | Bin(9, 1/2)) = 2 * (1 + 9 + 36) / 512 = 92 / 512.
    base = np.array([1] * 20 + [1] * 7 + [0] * 2 + [0] * 5)
    new = np.array([1] * 20 + [0] * 7 + [1] * 2 + [0] * 5)
    result = u.mcnemar(base, new)
    assert (result.base_only, result.new_only) == (7, 2)
    assert result.p_value == pytest.approx(92 / 512, rel=1e-12)
    assert u.mcnemar(base, base).p_value == 1.0
    with pytest.raises(DataError, match="0/1"):
        u.mcnemar([0.5, 1.0], [1.0, 1.0])


def test_holm_step_down():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06.
    assert u.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert u.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    adjusted = u.holm([0.02, math.nan, 0.04])  # NaN is no test: m = 2
    assert (
        adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    )


def test_chance_normalized_retention():
    assert u.retention(base=0.75, new=0.5, chance=0.25) == pytest.approx(0.5)
    assert u.retention(base=0.75, new=0.25, chance=0.25) == 0.0
    assert math.isnan(u.retention(base=0.25, new=0.5, chance=0.25))
    assert u.chance_level([4, 4, 2, None]) == pytest.approx((0.25 + 0.25 + 0.5 + 0.0) / 4)


def test_retention_interval_is_paired():
    base = np.array([1.0] * 60 + [0.0] * 40)
    new = base.copy()
    new[:10] = 0.0  # 10 of the base's right answers lost: 0.6 -> 0.5
    chance = np.full(100, 0.25)
    interval = u.retention_interval(base, new, chance, u.Bootstrap(seed=1))
    assert interval.estimate == pytest.approx((0.5 - 0.25) / (0.6 - 0.25))
    assert interval.low < interval.estimate < interval.high < 1.0
    same = u.retention_interval(base, base, chance, u.Bootstrap(300))
    assert (same.low, same.high) == (1.0, 1.0)
    assert math.isnan(u.retention_interval(np.zeros(4), np.ones(4), np.full(4, 0.5)).estimate)


def test_trivial_predictors():
    assert u.majority_class_accuracy([0, 1, 1, 1, 2]) == pytest.approx(0.6)
    # Longest options: 1, 0, 0 (first of a tie); labels 1, 1, 0 -> right, wrong, right.
    assert u.longest_answer_accuracy([[3, 10, 2], [5, 1], [4, 4]], [1, 1, 0]) == pytest.approx(2 / 3)


def test_inclusion_rule():
    trivial = {"majority class": 0.5, "longest answer": 0.4}
    included = u.inclusion(0.6, 0.25, trivial)
    assert included.included and "majority class" in included.reason
    at_chance = u.inclusion(0.24, 0.25, trivial)
    assert not at_chance.included and "chance 0.2500" in at_chance.reason
    below_majority = u.inclusion(0.45, 0.25, trivial)
    assert not below_majority.included and "majority class baseline 0.5000" in below_majority.reason
    assert not u.inclusion(0.5, 0.25, trivial).included  # "above" is strict
    assert u.inclusion(0.3, 0.0).included


def test_pairing_requires_the_same_examples():
    base, new = {"a": 1.0, "b": 0.0}, {"b": 1.0, "a": 0.0}
    b, n = u.paired(base, new)
    assert b.tolist() == [1.0, 0.0] and n.tolist() == [0.0, 1.0]  # matched by id, not by position
    with pytest.raises(u.PairingError, match="different examples") as error:
        u.paired(base, {"a": 1.0, "c": 0.0})
    assert isinstance(error.value, AvssError)  # the CLI prints one line and exits 2
    with pytest.raises(u.PairingError, match="repeat"):
        u.unique_ids(["a", "b", "a"], "task x")


def test_bootstrap_setting_is_validated_and_offsets_only_the_seed():
    with pytest.raises(ValueError, match="resamples"):
        u.Bootstrap(0)
    with pytest.raises(ValueError, match="confidence"):
        u.Bootstrap(confidence=1.0)
    assert u.Bootstrap(500, seed=2, confidence=0.9).offset(3) == u.Bootstrap(500, seed=5, confidence=0.9)
    values = np.arange(20.0)
    assert u.bootstrap_mean(values, u.Bootstrap(500, seed=7)) == u.bootstrap_mean(
        values, u.Bootstrap(500, seed=7)
    )
    assert u.bootstrap_mean(values, u.Bootstrap(500, seed=7)) != u.bootstrap_mean(
        values, u.Bootstrap(500, seed=8)
    )
