"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avss.evaluation import metrics


def test_accuracy_and_argmax_ties_go_first():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.argmax([-1.0, -1.0, -3.0]) == 0


def test_length_normalized_divides_by_characters():
    assert metrics.length_normalized([-4.0, -4.0], ["ab", "abcd"]) == [-2.0, -1.0]


def test_mc1():
    assert metrics.mc1([-1.0, -2.0, -3.0], [1, 0, 0]) == 1.0
    assert metrics.mc1([-2.0, -1.0, -3.0], [1, 0, 0]) == 0.0


def test_mc2_is_normalized_probability_of_true_answers():
    scores = [math.log(0.2), math.log(0.3), math.log(0.1)]
    assert metrics.mc2(scores, [1, 1, 0]) == pytest.approx(0.5 / 0.6)


def test_mc2_survives_underflow():
    # exp(-1000) is 0.0 in float64, so the naive ratio is 0/0; the answer is 1 / (1 + e^-1 + e^-2).
    scores = [-1000.0, -1001.0, -1002.0]
    with np.errstate(invalid="ignore"):
        naive = np.exp(scores[0]) / np.exp(scores).sum()
    assert math.isnan(naive)
    assert metrics.mc2(scores, [1, 0, 0]) == pytest.approx(1 / (1 + math.exp(-1) + math.exp(-2)), rel=1e-12)
    assert metrics.mc2([-1000.0, -5000.0], [0, 1]) == pytest.approx(0.0, abs=1e-300)


def test_mc3_fraction_of_true_answers_above_every_false_one():
    assert metrics.mc3([-1.0, -3.0, -2.0, -4.0], [1, 1, 0, 0]) == 0.5
    assert metrics.mc3([-1.0, -1.5, -2.0], [1, 1, 0]) == 1.0


def test_mc_metrics_need_both_kinds_of_options():
    with pytest.raises(ValueError):
        metrics.mc2([-1.0, -2.0], [1, 1])
    with pytest.raises(ValueError):
        metrics.mc3([-1.0, -2.0], [0, 0])


def test_average_precision_and_reciprocal_rank():
    scores = [0.9, 0.8, 0.7, 0.6]
    labels = [0, 1, 0, 1]
    # Relevant at ranks 2 and 4: precisions 1/2 and 2/4.
    assert metrics.average_precision(scores, labels) == pytest.approx(0.5)
    assert metrics.reciprocal_rank(scores, labels) == pytest.approx(0.5)
    # Ranks 1 and 3: (1 + 2/3) / 2.
    assert metrics.average_precision([3, 1, 2], [1, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.reciprocal_rank([3, 1, 2], [0, 0, 1]) == pytest.approx(0.5)


def test_ranking_ties_keep_source_order():
    assert metrics.reciprocal_rank([1.0, 1.0, 1.0], [0, 0, 1]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple  ", "apple"),
        ("U.S.A.", "usa"),
        ("A, B and the C", "b and c"),
        ("Theatre", "theatre"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


def test_exact_match_against_any_alias():
    assert metrics.exact_match("the Eiffel tower.", ["Tour Eiffel", "Eiffel Tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert metrics.exact_match("", ["a"]) == 1.0  # "a" normalizes to the empty string, as in SQuAD


def test_token_f1():
    # Prediction {cat, sat} vs {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8.
    assert metrics.token_f1("The cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert metrics.token_f1("The cat sat", ["dog", "cat sat"]) == pytest.approx(1.0)
    assert metrics.token_f1("dog", ["cat"]) == 0.0
    assert metrics.token_f1("", ["cat"]) == 0.0
    # Repeated tokens count once per occurrence in both.
    assert metrics.token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_perplexity_from_nll():
    assert metrics.perplexity_from_nll(3 * math.log(4.0), 3) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        metrics.perplexity_from_nll(1.0, 0)


def test_retained_inverts_perplexity():
    assert metrics.retained_ratio("perplexity", 10.0, 20.0) == 0.5
    assert metrics.retained_ratio("accuracy", 0.8, 0.4) == 0.5
    assert math.isnan(metrics.retained_ratio("accuracy", 0.0, 0.5))
