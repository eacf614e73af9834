"""Per-answer EAVSS statistics (they reproduce the streamed EAVSS, for any subset or weighting) and the tests
of the ranking built on them: the label-permutation null finds a planted signal and not an absent one, and
the bootstrap of the top-k set is stable exactly when there is a signal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _tiny import tiny_model
from avss.hallucination import load_pairs
from avss.hallucination.answer_stats import AnswerStats, collect_answer_stats
from avss.hallucination.scoring import EavssOptions, score_eavss
from avss.hallucination.significance import (
    bootstrap_topk,
    p_value,
    permutation_null,
    permute_within,
    spearman_to,
    topk_gap,
)
from avss.stats.accumulators import SiteBatch, Threshold, reduce_site
from test_hallucination import data_dir  # noqa: F401  (fixture)

LAYERS = 6


def synthetic_stats(
    questions: int = 30, answers: int = 4, planted: float = 1.0, layer: int = 2, seed: int = 0
) -> AnswerStats:
    """Answers of random activations reduced exactly as a model's are: every layer has its own scale, the
    same for truthful and hallucinated answers, except that hallucinated answers at ``layer`` are ``planted``
    times wider. Answers differ in length and in an answer-level scale shared by all layers. About 30% of the
    values are zeros, so near-zero counts (sparsity) are not dominated by counting noise."""
    generator = torch.Generator().manual_seed(seed)
    thresholds = (Threshold.parse("rel:0.01"),)
    rows, names, truthful = [], [], []
    for question in range(questions):
        for answer in range(answers):
            tokens = int(torch.randint(3, 9, (1,), generator=generator))
            own = float(torch.exp(0.2 * torch.randn(1, generator=generator)))
            per_layer = []
            for depth in range(LAYERS):
                scale = own * (1 + depth) * (planted if answer and depth == layer else 1.0)
                hidden = scale * torch.randn(1, tokens, 16, generator=generator)
                hidden *= torch.rand(hidden.shape, generator=generator) > 0.3  # a sparse share of exact zeros
                per_layer.append(reduce_site(hidden, torch.ones(1, tokens, dtype=torch.bool), thresholds)[0])
            rows.append(SiteBatch.stack(per_layer, "cpu"))
            names.append(f"question {question}")
            truthful.append(answer == 0)
    sums = {
        name: torch.stack([getattr(row, name) for row in rows]).reshape(len(rows), LAYERS)
        for name in ("count", "mean", "m2", "near_zero", "pooled_sum", "pooled_count")
    }
    return AnswerStats(tuple(names), torch.tensor(truthful), **sums)


def test_answer_stats_reproduce_the_streamed_eavss_on_a_tiny_model(tokenizer, data_dir: Path) -> None:  # noqa: F811
    model = tiny_model("llama", num_layers=4)
    pairs = load_pairs(["truthfulqa"], data_dir)[:12]
    options = EavssOptions(batch_size=5)
    stats = collect_answer_stats(model, tokenizer, pairs, options, progress=False)
    assert stats.num_rows == sum(1 + min(3, len(p.hallucinated)) for p in pairs) and stats.num_layers == 4
    streamed = score_eavss(model, tokenizer, pairs, options, progress=False).scores
    recomputed = stats.scores()
    for name in ("variance_truthful", "variance_hallucinated", "sparsity_truthful", "eavss"):
        torch.testing.assert_close(getattr(recomputed, name), getattr(streamed, name), rtol=1e-6, atol=0)
    assert recomputed.ranking() == streamed.ranking()
    # a subset of questions (one fold's training part) scores as if only those pairs had been streamed
    subset = {p.question for p in pairs[::2]}
    alone = score_eavss(model, tokenizer, pairs[::2], options, progress=False).scores
    torch.testing.assert_close(stats.select(subset).scores().eavss, alone.eavss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("site", ["mlp", "delta"])
def test_answer_stats_follow_the_site(tokenizer, data_dir: Path, site: str) -> None:  # noqa: F811
    model = tiny_model("gpt2", num_layers=3)
    pairs = load_pairs(["truthfulqa"], data_dir)[:6]
    options = EavssOptions(site=site, variance="pooled", batch_size=4)
    stats = collect_answer_stats(model, tokenizer, pairs, options, progress=False)
    streamed = score_eavss(model, tokenizer, pairs, options, progress=False).scores
    torch.testing.assert_close(stats.scores().eavss, streamed.eavss, rtol=1e-6, atol=0)


def test_weights_count_rows_as_if_repeated_and_save_round_trips(tmp_path: Path) -> None:
    stats = synthetic_stats(questions=5)
    weights = torch.ones(stats.num_rows, dtype=torch.float64)
    weights[:4] = 2.0  # question 0 twice
    doubled_rows = torch.cat([torch.arange(4), torch.arange(stats.num_rows)])
    doubled = AnswerStats(
        tuple(stats.questions[i] for i in doubled_rows.tolist()),
        stats.truthful[doubled_rows],
        *(getattr(stats, name)[doubled_rows] for name in ("count", "mean", "m2", "near_zero")),
        stats.pooled_sum[doubled_rows],
        stats.pooled_count[doubled_rows],
    )
    weighted = stats.eavss_many(stats.truthful.unsqueeze(0), weights.unsqueeze(0))[0]
    torch.testing.assert_close(weighted, doubled.scores().eavss)
    loaded = AnswerStats.load(stats.save(tmp_path / "answers.pt"))
    assert loaded.questions == stats.questions and loaded.options == stats.options
    torch.testing.assert_close(loaded.scores().eavss, stats.scores().eavss)


def test_permutations_shuffle_labels_within_questions_only() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    labels = torch.tensor([True, False, False, True, False, False, True, False, False])
    shuffled = permute_within(groups, labels, 500, torch.Generator().manual_seed(0))
    for group in range(3):
        rows = groups == group
        assert (shuffled[:, rows].sum(dim=1) == 1).all(), "one truthful answer per question"
        share = shuffled[:, rows].double().mean(dim=0)
        assert (share - 1 / int(rows.sum())).abs().max() < 0.08, "uniformly placed"
    again = permute_within(groups, labels, 500, torch.Generator().manual_seed(0))
    assert torch.equal(shuffled, again)


def test_p_value_counts_the_real_labelling_among_the_permutations() -> None:
    null = torch.tensor([0.1, 0.2, 0.3, 0.5])
    assert p_value(0.4, null) == pytest.approx(2 / 5)
    assert p_value(0.3, null) == pytest.approx(3 / 5), "ties count as at least as extreme"
    assert p_value(9.0, null) == pytest.approx(1 / 5), "never zero"


def test_ranking_statistics_by_hand() -> None:
    eavss = torch.tensor([[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    # relative values [2, 1, 1, 0]: top-1 mean 2, others' mean 2/3
    torch.testing.assert_close(topk_gap(eavss, 1), torch.tensor([4 / 3, 0.0], dtype=torch.float64))
    correlation = spearman_to(eavss[:1], torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(correlation, torch.tensor([1.0], dtype=torch.float64))


@pytest.mark.parametrize("statistic", ["topk_gap", "spread"])
def test_the_null_detects_a_planted_signal(statistic: str) -> None:
    stats = synthetic_stats(planted=1.25)
    assert stats.scores().top(1) == [2]
    result = permutation_null(stats, k=1, permutations=199, seed=0, statistic=statistic)
    assert result.p_value < 0.05, result.to_dict()
    assert result.p_value == pytest.approx(1 / 200)
    assert len(result.null) == 199 and result.to_dict()["null"]["q95"] < result.observed


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_the_null_does_not_detect_an_absent_signal(seed: int) -> None:
    stats = synthetic_stats(planted=1.0, seed=seed)
    result = permutation_null(stats, k=2, permutations=199, seed=seed)
    assert result.p_value > 0.1, result.to_dict()
    assert torch.equal(permutation_null(stats, k=2, permutations=199, seed=seed).null, result.null)


def test_the_bootstrap_keeps_a_planted_top_set_and_scatters_a_random_one() -> None:
    planted = bootstrap_topk(synthetic_stats(planted=1.25), k=1, resamples=100, seed=0)
    assert planted.top == [2] and float(planted.jaccard.mean()) > 0.95 and planted.inclusion[2] > 0.95
    absent = bootstrap_topk(synthetic_stats(planted=1.0), k=2, resamples=100, seed=0)
    assert float(absent.jaccard.mean()) < 0.8
    torch.testing.assert_close(absent.inclusion.sum(), torch.tensor(2.0, dtype=torch.float64))
    assert set(absent.to_dict()) >= {"top", "jaccard", "inclusion"}


def test_bad_k_or_statistic_is_refused() -> None:
    stats = synthetic_stats(questions=3)
    with pytest.raises(ValueError, match="k must be"):
        permutation_null(stats, k=LAYERS)
    with pytest.raises(ValueError, match="unknown ranking statistic"):
        permutation_null(stats, k=1, statistic="max")
