"""Each scorer against a direct computation on tiny random models; the shared pass against separate ones."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _tiny import random_batch, tiny_model
from avss.adapters import remove_layers
from avss.errors import PruneConfigError
from avss.scorers import (
    CachedContext,
    ScoringContext,
    available_scorers,
    context_for,
    get_scorer,
    split_methods,
)
from avss.scorers.avss import score_layers
from avss.stats.collect import collect_statistics

ARCHITECTURES = ("llama", "gemma3_text", "gpt2")


def batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [random_batch(3, 12, seed=seed), random_batch(2, 9, seed=seed + 1)]


def hidden_states(model, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.base_model(**batch, output_hidden_states=True, use_cache=False).hidden_states


def direct_nll(model, data) -> float:
    """Mean next-token NLL over real tokens from the full model's logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data:
            logits = model(**batch, use_cache=False).logits[:, :-1]
            keep = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
            total += float(F.cross_entropy(logits[keep], batch["input_ids"][:, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def test_registry_lists_every_method():
    assert {
        "avss",
        "variance",
        "sparsity",
        "random",
        "first",
        "last",
        "block_influence",
        "angular",
        "loo_nll",
    } <= set(available_scorers())


def test_method_specs_parse_options_and_reject_unknown_ones():
    scorer = get_scorer("avss[site=delta,threshold=abs:1e-5]")
    assert (scorer.site, scorer.threshold, scorer.variance) == ("delta", "abs:1e-05", "elements")
    assert scorer.spec == "avss[site=delta,threshold=abs:1e-05]"
    assert get_scorer("avss").spec == "avss"
    assert get_scorer("random[seed=3]").seed == 3
    assert split_methods("avss[site=mlp,variance=pooled],random, angular") == [
        "avss[site=mlp,variance=pooled]",
        "random",
        "angular",
    ]
    for bad in ("nope", "avss[colour=red]", "avss[site=elbow]", "random[seed=x]"):
        with pytest.raises(PruneConfigError):
            get_scorer(bad)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_block_influence_equals_one_minus_cosine_of_hidden_states(model_type):
    model = tiny_model(model_type, 4)
    data = batches()
    importance = get_scorer("block_influence").score(ScoringContext(model, data))
    cos_sum, count = torch.zeros(4, dtype=torch.float64), 0
    for batch in data:
        states = hidden_states(model, batch)
        mask = batch["attention_mask"].bool()
        # output_hidden_states applies the final norm to the last entry; take the raw block output instead.
        outputs = [*list(states[1:-1]), last_block_output(model, batch)]
        for layer in range(4):
            cos_sum[layer] += (
                F.cosine_similarity(states[layer][mask], outputs[layer][mask], dim=-1).double().sum()
            )
        count += int(mask.sum())
    torch.testing.assert_close(importance.scores, 1 - cos_sum / count, rtol=1e-5, atol=1e-6)


def last_block_output(model, batch) -> torch.Tensor:
    from avss.adapters import first_tensor, get_adapter

    captured = {}
    handle = (
        get_adapter(model)
        .blocks[-1]
        .register_forward_hook(lambda module, args, output: captured.setdefault("h", first_tensor(output)))
    )
    with torch.no_grad():
        model.base_model(**batch, use_cache=False)
    handle.remove()
    return captured["h"]


def test_angular_distance_and_contiguous_selection():
    model = tiny_model("llama", 6)
    data = batches()
    scorer = get_scorer("angular")
    importance = scorer.score(ScoringContext(model, data))
    total = torch.zeros(7, 7, dtype=torch.float64)
    sequences = 0
    for batch in data:
        states = [*list(hidden_states(model, batch)[:-1]), last_block_output(model, batch)]
        last = batch["attention_mask"].sum(dim=1) - 1
        rows = torch.arange(last.numel())
        unit = torch.stack([F.normalize(s[rows, last].double(), dim=-1) for s in states])
        cosine = torch.einsum("ibd,jbd->bij", unit, unit).clamp(-1, 1)
        total += (torch.arccos(cosine) / math.pi).sum(dim=0)
        sequences += last.numel()
    distance = total / sequences
    torch.testing.assert_close(importance.scores, distance.diagonal(offset=1), rtol=1e-5, atol=1e-6)
    spans = [float(distance[start, start + 3]) for start in range(4)]
    best = min(range(4), key=spans.__getitem__)
    assert scorer.select(importance, 3, set()) == [best, best + 1, best + 2]
    assert all(layer not in {best} for layer in scorer.select(importance, 2, {best}))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("cached", [False, True])
def test_loo_nll_equals_nll_with_the_block_removed_minus_base(model_type, cached):
    model = tiny_model(model_type, 4)
    data = batches()
    kind = CachedContext if cached else ScoringContext
    importance = get_scorer("loo_nll").score(kind(model, data))
    base = direct_nll(model, data)
    for layer in range(4):
        pruned = copy.deepcopy(model)
        remove_layers(pruned, [layer])
        assert importance.scores[layer].item() == pytest.approx(direct_nll(pruned, data) - base, abs=1e-4)


@pytest.mark.parametrize("cached", [False, True])
def test_loo_nll_batches_reads_only_the_first_calibration_batches(cached):
    """``loo_nll[batches=1]`` on two batches scores as ``loo_nll`` on the first batch alone, also after a
    removal (the cached context keeps every batch's states), and unlike ``loo_nll`` on both."""
    kind = CachedContext if cached else ScoringContext
    limited = get_scorer("loo_nll[batches=1]")
    context = kind(tiny_model("llama", 5), batches())
    alone = kind(tiny_model("llama", 5), batches()[:1])
    every = get_scorer("loo_nll").score(context)
    for layer in (None, 2):
        if layer is not None:
            for each in (context, alone):
                remove_layers(each.model, [layer])
                each.removed(layer)
        importance = limited.score(context)
        assert importance.details["sequences"] == 3
        expected_base = direct_nll(alone.model, batches()[:1])
        assert importance.details["base_nll"] == pytest.approx(expected_base, abs=1e-5)
        torch.testing.assert_close(importance.scores, get_scorer("loo_nll").score(alone).scores)
    assert not torch.allclose(limited.score(kind(tiny_model("llama", 5), batches())).scores, every.scores)


def test_context_for_keeps_only_the_batches_its_scorers_read():
    model, limited = tiny_model("llama", 4), get_scorer("loo_nll[batches=1]")
    assert len(context_for(model, batches(), [limited]).batches) == 1
    assert len(context_for(model, batches(), [limited, get_scorer("avss")]).batches) == 2
    assert len(context_for(model, batches(), [get_scorer("loo_nll")]).batches) == 2


def test_optional_number_options_parse_and_refuse_bad_values():
    assert get_scorer("loo_nll[batches=4]").batches == 4
    assert get_scorer("loo_nll").batches is None
    for spec in ("loo_nll[batches=0]", "loo_nll[batches=two]"):
        with pytest.raises(PruneConfigError, match="batches"):
            get_scorer(spec)


@pytest.mark.parametrize(
    "method", ["avss", "avss[site=delta,variance=pooled]", "avss[site=mlp,threshold=abs:1e-5]"]
)
def test_avss_scorer_matches_score_layers(method):
    model = tiny_model("llama", 4)
    scorer = get_scorer(method)
    importance = scorer.score(context_for(model, batches(), [scorer], cached=False))
    stats = collect_statistics(
        model, batches(), sites=(scorer.site,), thresholds=(scorer.threshold,), progress=False
    )
    expected = score_layers(stats, scorer.site, scorer.variance, scorer.threshold)
    torch.testing.assert_close(importance.scores, expected.avss)


def test_ablations_are_the_two_halves_of_avss():
    model = tiny_model("llama", 4)
    context = ScoringContext(model, batches())
    avss = get_scorer("avss").score(context).scores
    variance = get_scorer("variance").score(context).scores
    inverse_sparsity = get_scorer("sparsity").score(context).scores
    torch.testing.assert_close(avss, variance * inverse_sparsity)


def test_position_and_random_baselines():
    context = ScoringContext(tiny_model("llama", 5), batches())
    assert get_scorer("last").select(get_scorer("last").score(context), 2, set()) == [2, 3]
    assert get_scorer("first").select(get_scorer("first").score(context), 2, set()) == [0, 1]
    first = get_scorer("random[seed=1]").score(context).scores
    torch.testing.assert_close(first, get_scorer("random[seed=1]").score(context).scores)
    assert not torch.equal(first, get_scorer("random[seed=2]").score(context).scores)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_shared_pass_gives_the_same_scores_as_separate_passes(model_type):
    model = tiny_model(model_type, 4)
    methods = [
        "avss",
        "avss[site=delta]",
        "avss[site=mlp,variance=pooled]",
        "variance",
        "block_influence",
        "angular",
    ]
    scorers = [get_scorer(method) for method in methods]
    shared = context_for(model, batches(), scorers, cached=False)
    for scorer in scorers:
        alone = context_for(model, batches(), [scorer], cached=False)
        torch.testing.assert_close(scorer.score(shared).scores, scorer.score(alone).scores)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_cached_context_matches_direct_context_before_and_after_removals(model_type):
    methods = ["avss", "avss[site=delta]", "avss[site=mlp]", "block_influence", "angular", "loo_nll"]
    scorers = [get_scorer(method) for method in methods]
    direct_model, cached_model = tiny_model(model_type, 5), tiny_model(model_type, 5)
    direct = context_for(direct_model, batches(), scorers, cached=False)
    cached = context_for(cached_model, batches(), scorers, cached=True)
    for layer in (None, 2, 3, 0):
        if layer is not None:
            for context in (direct, cached):
                remove_layers(context.model, [layer])
                context.removed(layer)
        for scorer in scorers:
            torch.testing.assert_close(
                scorer.score(cached).scores, scorer.score(direct).scores, rtol=1e-6, atol=1e-7
            )
