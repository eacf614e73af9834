"""LLM-Drop's sublayer influence (attn_influence, mlp_influence): against a direct computation on stored
activations, streamed sums that merge exactly, and the cached context giving the plain one's answer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _precision import FLOAT32_PATHS
from _tiny import random_batch, tiny_model
from avss.adapters import get_adapter, remove_layers
from avss.errors import PruneConfigError, UnsupportedArchitectureError
from avss.scorers import CachedContext, ScoringContext, context_for, get_scorer
from avss.stats.accumulators import ActivationStats, SublayerStats
from avss.stats.collect import collect_statistics
from avss.stats.distributed import pack, unpack

# The module whose output the block adds to its residual stream after attention, by hand for each family:
# the attention itself in pre-LN decoders, its post-attention norm in Gemma 3 and OLMo 2.
ATTENTION_OUTPUT = {
    "llama": "self_attn",
    "qwen2": "self_attn",
    "gpt2": "attn",
    "gemma3_text": "post_attention_layernorm",
    "olmo2": "post_attention_layernorm",
}


def batches() -> list[dict[str, torch.Tensor]]:
    return [random_batch(3, 12, seed=0), random_batch(2, 9, seed=1)]


def direct_influence(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``1 - mean cos`` per block from stored activations: the block's input ``x``, the attention output the
    block adds (``a``, per :data:`ATTENTION_OUTPUT`) and the block's output ``y``; attention compares ``x``
    with ``x + a``, the MLP ``x + a`` with ``y``. All real tokens of all batches are pooled, then averaged."""
    adapter = get_adapter(model)
    stored: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(adapter.blocks):

        def keep_input(module, args, kwargs, layer=layer):
            stored["x", layer] = kwargs.get("hidden_states", args[0] if args else None)

        def keep(name, layer=layer):
            return lambda module, args, output: stored.__setitem__(
                (name, layer), output[0] if isinstance(output, tuple) else output
            )

        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(block.register_forward_hook(keep("y")))
        added = block.get_submodule(ATTENTION_OUTPUT[model.config.model_type])
        handles.append(added.register_forward_hook(keep("a")))
    cosines: dict[str, list[list[torch.Tensor]]] = {"attn": [], "mlp": []}
    try:
        for batch in data:
            with torch.no_grad():
                model.base_model(**batch, use_cache=False)
            mask = batch["attention_mask"].bool()
            for kind in cosines:
                cosines[kind].append([])
            for layer in range(adapter.num_layers):
                x, a, y = (stored[name, layer][mask].double() for name in ("x", "a", "y"))
                cosines["attn"][-1].append(F.cosine_similarity(x, x + a, dim=-1))
                cosines["mlp"][-1].append(F.cosine_similarity(x + a, y, dim=-1))
    finally:
        for handle in handles:
            handle.remove()
    return {
        kind: torch.stack(
            [
                1 - torch.cat([per_batch[layer] for per_batch in values]).mean()
                for layer in range(len(values[0]))
            ]
        )
        for kind, values in cosines.items()
    }


@pytest.mark.parametrize("model_type", sorted(ATTENTION_OUTPUT))
def test_sublayer_influence_equals_a_direct_computation(model_type):
    model = tiny_model(model_type)
    data = batches()
    expected = direct_influence(model, data)
    scorers = [get_scorer("attn_influence"), get_scorer("mlp_influence")]
    context = context_for(model, data, scorers, cached=False)
    for scorer, kind in zip(scorers, ("attn", "mlp"), strict=True):
        scores = scorer.score(context).scores
        # float32 cosines summed in float64 against float64 cosines of the same float32 activations
        torch.testing.assert_close(scores, expected[kind], rtol=0, atol=FLOAT32_PATHS)
    assert not torch.allclose(expected["attn"], expected["mlp"])


def test_padding_does_not_count():
    """The same sequences with extra padding columns give the same scores."""
    model = tiny_model("llama")
    batch = random_batch(3, 12, seed=0)
    padded = {key: F.pad(value, (0, 5)) for key, value in batch.items()}
    scorer = get_scorer("attn_influence")
    plain = scorer.score(context_for(model, [batch], [scorer], cached=False)).scores
    extra = scorer.score(context_for(model, [padded], [scorer], cached=False)).scores
    torch.testing.assert_close(plain, extra, rtol=0, atol=FLOAT32_PATHS)


def test_streamed_sums_merge_exactly_into_the_one_pass_sums():
    model = tiny_model("llama")
    data = [*batches(), random_batch(2, 7, seed=2)]
    one_pass = collect_statistics(model, data, progress=False, sublayers=True)
    shards = [
        collect_statistics(model, part, progress=False, sublayers=True) for part in (data[:1], data[1:])
    ]
    merged = shards[0].merge(shards[1])
    assert one_pass.sublayers is not None and merged.sublayers is not None
    for name, value in one_pass.sublayers.tensors().items():
        torch.testing.assert_close(merged.sublayers.tensors()[name], value, rtol=1e-12, atol=1e-12)
    for kind in ("attn", "mlp"):
        torch.testing.assert_close(merged.sublayers.influence(kind), one_pass.sublayers.influence(kind))
    # Real tokens only: every layer counted the same tokens.
    tokens = sum(int(batch["attention_mask"].sum()) for batch in data)
    assert one_pass.sublayers.attn_count.tolist() == [tokens] * 4 == one_pass.sublayers.mlp_count.tolist()


def test_sublayer_sums_survive_checkpoints_and_the_process_merge():
    stats = collect_statistics(tiny_model("llama"), batches(), progress=False, sublayers=True)
    restored = ActivationStats.from_state_dict(stats.state_dict())
    unpacked = unpack(pack(stats), stats)
    for copy_ in (restored, unpacked):
        assert copy_.sublayers is not None
        for name, value in stats.sublayers.tensors().items():
            assert torch.equal(copy_.sublayers.tensors()[name], value)
    plain = collect_statistics(tiny_model("llama"), batches(), progress=False)
    assert plain.sublayers is None and "sublayers" not in plain.state_dict()
    assert unpack(pack(plain), plain).sublayers is None
    with pytest.raises(ValueError, match="with and without sublayer"):
        stats.merge(plain)


def test_sublayer_stats_by_hand():
    stats = SublayerStats(2)
    stats.fold("attn", torch.tensor([1.5, 2.0], dtype=torch.float64), torch.tensor([2.0, 4.0]))
    stats.fold("mlp", torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.0]), layers=[1])
    assert stats.influence("attn").tolist() == [1 - 0.75, 1 - 0.5]
    assert stats.influence("mlp").tolist() == [1.0, 0.5]  # no token seen: cos sum 0
    with pytest.raises(ValueError, match="unknown sublayer"):
        stats.influence("ffn")


def test_cached_context_matches_the_plain_one_before_and_after_a_removal():
    """The cached context re-runs only blocks after a removed one; the sublayer sums of the earlier blocks are
    kept, and the answer is that of a fresh pass over the pruned model."""
    model = tiny_model("llama", 5)
    data = batches()
    scorer = get_scorer("attn_influence")
    cached = CachedContext(model, data, sublayers=True)
    plain = ScoringContext(copy.deepcopy(model), data, sublayers=True)
    torch.testing.assert_close(scorer.score(cached).scores, scorer.score(plain).scores)
    remove_layers(model, [2])
    cached.removed(2)
    fresh = ScoringContext(model, data, sublayers=True)
    # The re-run blocks take another float32 path (injected state, sliced model): float32 round-off apart.
    torch.testing.assert_close(
        scorer.score(cached).scores, scorer.score(fresh).scores, rtol=0, atol=FLOAT32_PATHS
    )


def test_scorers_share_one_pass_and_say_what_they_need():
    scorers = [get_scorer("avss"), get_scorer("attn_influence")]
    context = context_for(tiny_model("llama"), batches(), scorers, cached=False)
    assert context.sublayers and get_scorer("mlp_influence").needs_sublayers
    assert not context_for(tiny_model("llama"), batches(), [get_scorer("avss")]).sublayers
    without = ScoringContext(tiny_model("llama"), batches())
    with pytest.raises(PruneConfigError, match="needs the sublayer similarities"):
        get_scorer("attn_influence").score(without)


def test_architectures_without_a_stream_between_sublayers_are_refused():
    for model_type in ("gpt_neox", "bert"):
        with pytest.raises(UnsupportedArchitectureError, match="sublayers cannot be scored or removed"):
            collect_statistics(tiny_model(model_type), batches(), progress=False, sublayers=True)
