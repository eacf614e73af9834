"""Pure metric functions: plain numbers in, plain numbers out, no model and no tensors.

Keeping the arithmetic apart from the model plumbing is what lets every metric be checked against values
computed by hand (see ``tests/test_evaluation_metrics.py``).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp

# Per-example right-or-wrong metrics: a comparison tests them with McNemar and reports chance-normalized
# retention (when every example's value is 0 or 1). Other means (F1, MC2, MAP) get intervals only, even on a
# sample where they happen to be 0 or 1 everywhere.
ACCURACY_METRICS = frozenset({"accuracy", "accuracy_norm", "mc1", "exact_match", "probe_accuracy"})

# Metrics where smaller is better: `retained_ratio` inverts their ratio, so 100% always means "as good as the
# base". Comparisons with intervals and chance-normalized retention live in avss.evaluation.comparison.
LOWER_IS_BETTER = frozenset({"perplexity"})


# --- multiple choice -------------------------------------------------------------------------------------


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("accuracy needs equally long, non-empty predictions and labels")
    return sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def argmax(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the first, as in lm-evaluation-harness (``np.argmax``)."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


def length_normalized(scores: Sequence[float], choices: Sequence[str]) -> list[float]:
    """Log-likelihood per character of the choice text (lm-evaluation-harness ``acc_norm``)."""
    return [score / max(len(choice), 1) for score, choice in zip(scores, choices, strict=True)]


def mc1(scores: Sequence[float], labels: Sequence[int]) -> float:
    """1.0 when the single true option (label 1) has the highest log-likelihood, else 0.0."""
    return float(labels[argmax(scores)] == 1)


def mc2(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Normalized probability mass on the true options: ``sum_true p / sum_all p`` with ``p = exp(score)``.

    Computed in log space (``exp(lse(true) - lse(all))``): summed log-probabilities of whole answers are often
    below -745, where ``exp`` underflows to 0 and the naive ratio becomes 0/0.
    """
    values = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(labels) == 1
    if not mask.any() or mask.all():
        raise ValueError("mc2 needs at least one true and one false option")
    return float(np.exp(logsumexp(values[mask]) - logsumexp(values)))


def mc3(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Fraction of true options that score above every false option (TruthfulQA's MC3)."""
    values = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(labels) == 1
    if not mask.any() or mask.all():
        raise ValueError("mc3 needs at least one true and one false option")
    return float(np.mean(values[mask] > values[~mask].max()))


# --- ranking ---------------------------------------------------------------------------------------------


def _ranked_relevance(scores: Sequence[float], labels: Sequence[int]) -> np.ndarray:
    # A stable sort keeps source order among ties, so the result never depends on the sorting algorithm.
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    relevance = np.asarray(labels)[order] == 1
    if not relevance.any():
        raise ValueError("ranking metrics need at least one relevant candidate")
    return relevance


def average_precision(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Mean of precision@k over the ranks k of the relevant candidates (a question's AP; MAP averages it)."""
    relevance = _ranked_relevance(scores, labels)
    hits = np.cumsum(relevance)
    ranks = np.flatnonzero(relevance) + 1
    return float(np.mean(hits[relevance] / ranks))


def reciprocal_rank(scores: Sequence[float], labels: Sequence[int]) -> float:
    """1 / rank of the first relevant candidate (one question's RR; MRR averages it)."""
    relevance = _ranked_relevance(scores, labels)
    return 1.0 / (int(np.argmax(relevance)) + 1)


# --- short answers (SQuAD conventions) -------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized answer."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in answers))


def _f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    if not prediction_tokens or not answer_tokens:
        # SQuAD: two empty answers agree perfectly; one empty answer shares nothing.
        return float(prediction_tokens == answer_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(answer_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-words F1 between the normalized prediction and any normalized answer."""
    tokens = normalize_answer(prediction).split()
    return max((_f1(tokens, normalize_answer(answer).split()) for answer in answers), default=0.0)


# --- language modelling ----------------------------------------------------------------------------------


def perplexity_from_nll(total_nll: float, num_tokens: int) -> float:
    """``exp`` of the mean per-token negative log-likelihood (natural log)."""
    if num_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / num_tokens)


# --- comparison ------------------------------------------------------------------------------------------


def retained_ratio(metric: str, base: float, new: float) -> float:
    """How much of the base score ``new`` keeps: ``new / base``, or ``base / new`` where lower is better."""
    numerator, denominator = (base, new) if metric in LOWER_IS_BETTER else (new, base)
    if denominator == 0:
        return math.nan
    return numerator / denominator
