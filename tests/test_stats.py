"""Streaming statistics against numpy, shard merges, and thresholds."""

import numpy as np
import pytest
import torch

from avss.stats.accumulators import (
    ActivationStats,
    RelationStats,
    SiteBatch,
    SiteStats,
    Threshold,
    batch_moments,
    chan_merge,
    masked_cosine_sum,
    near_zero_counts,
    pooled_variance_sum,
    reduce_site,
)


def _fold(values: list[torch.Tensor]):
    count = mean = m2 = torch.zeros((), dtype=torch.float64)
    for chunk in values:
        count, mean, m2 = chan_merge(count, mean, m2, *batch_moments(chunk))
    return count, mean, m2


def test_streamed_moments_equal_numpy():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 7, generator=generator) * 3 + 2 for n in (5, 1, 13, 8)]
    count, mean, m2 = _fold(chunks)
    flat = torch.cat(chunks).numpy().astype(np.float64).ravel()
    assert count.item() == flat.size
    assert mean.item() == pytest.approx(flat.mean(), rel=1e-12)
    assert (m2 / count).item() == pytest.approx(flat.var(), rel=1e-12)


def test_chan_merge_of_shards_equals_one_pass():
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(40, 6, generator=generator) * 1e3 + 5e3
    one = _fold([data])
    a, b = _fold([data[:17]]), _fold([data[17:]])
    merged = chan_merge(*a, *b)
    for got, want in zip(merged, one, strict=True):
        assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_merge_with_empty_side_is_identity():
    data = torch.arange(6.0)
    stats = batch_moments(data)
    empty = (torch.tensor(0.0, dtype=torch.float64),) * 3
    assert [t.item() for t in chan_merge(*empty, *stats)] == [t.item() for t in stats]
    assert [t.item() for t in chan_merge(*stats, *empty)] == [t.item() for t in stats]


def test_threshold_parsing_and_errors():
    assert Threshold.parse("abs:1e-5") == Threshold("abs", 1e-5)
    assert str(Threshold.parse("rel:0.01")) == "rel:0.01"
    for bad in ("abs", "foo:1", "rel:-1", "abs:x", "rel:nan"):
        with pytest.raises(ValueError, match="invalid threshold"):
            Threshold.parse(bad)


def test_near_zero_counts_by_hand():
    tokens = torch.tensor([[0.0, 1e-6, 0.5, -2.0], [3.0, -0.02, 4.0, 0.0]])
    counts = near_zero_counts(tokens, (Threshold("abs", 1e-5), Threshold("rel", 0.01)))
    # rms row 0 = sqrt((0 + 1e-12 + .25 + 4) / 4) = 1.0308 -> limit .0103: 0 and 1e-6 count.
    # rms row 1 = sqrt((9 + 4e-4 + 16 + 0) / 4) = 2.5 -> limit .025: -0.02 and 0 count.
    assert counts.tolist() == [3.0, 4.0]


def test_pooled_variance_by_hand():
    hidden = torch.tensor([[[1.0, 3.0], [3.0, 5.0], [100.0, 100.0]], [[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, sequences = pooled_variance_sum(hidden, mask)
    # Sequence 0 pooled = [2, 4] -> variance 1; sequence 1 pooled = [2, 2] -> variance 0.
    assert total.item() == pytest.approx(1.0)
    assert sequences.item() == 2


def test_site_stats_merge_equals_single_pass():
    thresholds = (Threshold("abs", 0.1), Threshold("rel", 0.5))
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 5, 3, generator=generator)
    mask = torch.ones(4, 5, dtype=torch.bool)
    whole, first, second = (SiteStats(2, thresholds) for _ in range(3))
    for layer in range(2):
        whole.update(layer, hidden * (layer + 1), mask)
        first.update(layer, hidden[:2] * (layer + 1), mask[:2])
        second.update(layer, hidden[2:] * (layer + 1), mask[2:])
    merged = first.merge(second)
    for name, tensor in whole.tensors().items():
        torch.testing.assert_close(merged.tensors()[name], tensor, rtol=1e-9, atol=1e-12)


def test_relation_stats_by_hand():
    relations = RelationStats(1)
    before = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    after = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    relations.update_cosine(0, before, after)
    assert relations.block_influence.item() == pytest.approx(0.5)
    states = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (depths=2, batch=1, dim=2)
    relations.update_angular(states)
    assert relations.angular_distance[0, 1].item() == pytest.approx(0.5)
    assert relations.angular_distance[0, 0].item() == pytest.approx(0.0, abs=1e-6)


def test_state_dict_round_trip_is_exact():
    thresholds = (Threshold("abs", 1e-5),)
    stats = ActivationStats.empty(3, ("block",), thresholds)
    hidden = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    stats.sites["block"].update(1, hidden, mask)
    restored = ActivationStats.from_state_dict(stats.state_dict())
    for name, tensor in stats.sites["block"].tensors().items():
        assert torch.equal(restored.sites["block"].tensors()[name], tensor)


def test_fused_site_reduction_equals_numpy_on_the_real_tokens():
    """One fused pass over (B, T, D) with a mask equals numpy on the gathered real tokens, even with a large
    offset (two-pass per-token moments and the within-token plus between-token M2 avoid sum-of-squares
    cancellation). Per-token reductions run in float32, so agreement is to float32 rounding."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 16, generator=generator) * 0.5 + 1e3
    hidden[0, 0, :4] = 0.0
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    hidden[~mask] = float("nan")  # padding never leaks into the statistics
    thresholds = (Threshold("abs", 1e-5), Threshold("rel", 0.9995))
    batch, norms = reduce_site(hidden, mask, thresholds)
    tokens = hidden[mask].double().numpy()
    assert batch.count.item() == tokens.size
    assert batch.mean.item() == pytest.approx(tokens.mean(), rel=1e-7)
    assert (batch.m2 / batch.count).item() == pytest.approx(tokens.var(), rel=1e-6)
    rms = np.sqrt((tokens**2).mean(axis=1, keepdims=True))
    expected = [(np.abs(tokens) < 1e-5).sum(), (np.abs(tokens) < 0.9995 * rms).sum()]
    assert batch.near_zero.tolist() == expected
    torch.testing.assert_close(norms[mask], torch.linalg.vector_norm(hidden[mask].double(), dim=-1))


def test_vectorized_fold_equals_per_layer_updates():
    thresholds = (Threshold("rel", 0.5),)
    generator = torch.Generator().manual_seed(4)
    hidden = [torch.randn(2, 5, 4, generator=generator) * (layer + 1) for layer in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    one_by_one, folded = SiteStats(3, thresholds), SiteStats(3, thresholds)
    for layer, values in enumerate(hidden):
        one_by_one.update(layer, values, mask)
    folded.fold(SiteBatch.stack([reduce_site(values, mask, thresholds)[0] for values in hidden], "cpu"))
    for name, tensor in one_by_one.tensors().items():
        torch.testing.assert_close(folded.tensors()[name], tensor, rtol=1e-12, atol=0)


def test_masked_cosine_matches_torch_cosine_similarity():
    generator = torch.Generator().manual_seed(5)
    before, after = torch.randn(2, 6, 8, generator=generator), torch.randn(2, 6, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    total, count = masked_cosine_sum(before, after, mask)
    expected = torch.nn.functional.cosine_similarity(before[mask], after[mask], dim=-1)
    assert count.item() == 10
    assert total.item() == pytest.approx(expected.double().sum().item(), rel=1e-6)
