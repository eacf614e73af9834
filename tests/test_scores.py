"""AVSS math against values computed by hand."""

import pytest
import torch

from avss.scorers.avss import avss, normalize, score_layers, sparsity
from avss.stats.accumulators import ActivationStats, Threshold


def test_normalize_and_avss_by_hand():
    variance = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    sparse = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    # V~ = [.25, .5, .25], S~ = [.5, .25, .25] -> AVSS = [.5, 2, 1]
    assert avss(variance, sparse).tolist() == pytest.approx([0.5, 2.0, 1.0])
    assert normalize(avss(variance, sparse)).tolist() == pytest.approx([0.5 / 3.5, 2 / 3.5, 1 / 3.5])


def test_normalize_rejects_degenerate_input():
    with pytest.raises(ValueError):
        normalize(torch.zeros(3))
    with pytest.raises(ValueError):
        normalize(torch.tensor([1.0, float("nan")]))


def test_sparsity_floor_for_layers_without_near_zero_values():
    values, floored = sparsity(torch.tensor([0.0, 5.0]), torch.tensor([9.0, 10.0]))
    assert values.tolist() == pytest.approx([1 / 10, 0.5])
    assert floored.tolist() == [True, False]


def test_score_layers_from_statistics_matches_manual_computation():
    thresholds = (Threshold("abs", 0.5),)
    stats = ActivationStats.empty(2, ("block",), thresholds)
    layer0 = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)  # var 1.25, sparsity 1/4
    layer1 = torch.tensor([[0.0, 0.1], [4.0, -4.0]], dtype=torch.float64)  # var 8.0025..., sparsity 2/4
    mask = torch.ones(1, 2, dtype=torch.bool)
    for layer, tokens in enumerate((layer0, layer1)):
        stats.sites["block"].update(layer, tokens.unsqueeze(0), mask)
    scores = score_layers(stats, "block", "elements", "abs:0.5")
    v = torch.stack([layer0.var(unbiased=False), layer1.var(unbiased=False)])
    s = torch.tensor([0.25, 0.5], dtype=torch.float64)
    expected = (v / v.sum()) / (s / s.sum())
    assert scores.avss.tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert scores.ranking() == torch.argsort(expected).tolist()
    assert scores.floored == [] and scores.warnings() == []


def test_floored_layers_produce_a_warning():
    stats = ActivationStats.empty(2, ("block",), (Threshold("abs", 1e-9),))
    tokens = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    for layer in range(2):
        stats.sites["block"].update(
            layer, tokens.unsqueeze(0) * (layer + 1), torch.ones(1, 3, dtype=torch.bool)
        )
    scores = score_layers(stats, threshold="abs:1e-9")
    assert scores.floored == [0, 1]
    assert "floored" in scores.warnings()[0]


def test_unmeasured_threshold_or_site_is_an_error():
    stats = ActivationStats.empty(2, ("block",), (Threshold("abs", 1e-5),))
    with pytest.raises(ValueError, match="was not measured"):
        score_layers(stats, threshold="rel:0.01")
    with pytest.raises(ValueError, match="was not measured"):
        score_layers(stats, site="mlp", threshold="abs:1e-5")
