"""Every supported architecture: blocks, sites and statistics through real hooks on tiny models."""

import pytest
import torch

from _tiny import ENCODERS, TINY_CONFIGS, random_batch, tiny_model
from avss.adapters import SITES, get_adapter, supported_model_types
from avss.errors import UnsupportedArchitectureError
from avss.stats.collect import collect_statistics


def test_table_covers_the_required_families():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"}
    required |= {"gpt_neox", "opt", "bert", "distilbert", "roberta"}
    assert required <= set(supported_model_types())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_blocks_sites_and_statistics(model_type):
    model = tiny_model(model_type, num_layers=3)
    adapter = get_adapter(model)
    assert adapter.num_layers == 3
    assert adapter.causal == (model_type not in ENCODERS)
    for site in SITES:
        assert isinstance(adapter.site_module(2, site), torch.nn.Module)
    stats = collect_statistics(model, [random_batch()], sites=SITES, progress=False)
    real_tokens = int(random_batch()["attention_mask"].sum())
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim
    for site in ("block", "delta", "attn"):
        assert stats.sites[site].count.tolist() == [real_tokens * hidden] * 3, site
    assert (stats.sites["mlp"].count > stats.sites["block"].count).all()
    assert torch.isfinite(stats.relations.block_influence).all()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_block_statistics_match_output_hidden_states(model_type):
    """The block site equals the statistics of the model's own hidden states (minus the final norm)."""
    model = tiny_model(model_type, num_layers=3)
    batch = random_batch()
    stats = collect_statistics(model, [batch], sites=("block",), progress=False)
    with torch.no_grad():
        states = model.base_model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    for layer in range(2):  # the last entry of hidden_states may have the final norm applied
        values = states[layer + 1][mask].double()
        assert stats.sites["block"].mean[layer].item() == pytest.approx(
            values.mean().item(), rel=1e-6, abs=1e-8
        )
        var = stats.sites["block"].variance_elements[layer].item()
        assert var == pytest.approx(values.var(unbiased=False).item(), rel=1e-6)
        cos = torch.nn.functional.cosine_similarity(states[layer][mask], states[layer + 1][mask], dim=-1)
        assert stats.relations.block_influence[layer].item() == pytest.approx(1 - cos.mean().item(), abs=1e-5)


def test_padding_does_not_change_statistics():
    model = tiny_model("llama", num_layers=2)
    batch = random_batch(batch=1, length=8, pad_rows=False)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.zeros(1, 5, dtype=torch.long)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(1, 5, dtype=torch.long)], dim=1),
    }
    plain = collect_statistics(model, [batch], sites=("block", "mlp"), progress=False)
    with_pad = collect_statistics(model, [padded], sites=("block", "mlp"), progress=False)
    for site in ("block", "mlp"):
        for name, tensor in plain.sites[site].tensors().items():
            torch.testing.assert_close(with_pad.sites[site].tensors()[name], tensor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        with_pad.relations.angular_sum, plain.relations.angular_sum, rtol=1e-5, atol=1e-6
    )


def test_two_batches_equal_their_merged_shards():
    model = tiny_model("qwen2", num_layers=2)
    batches = [random_batch(seed=1), random_batch(seed=2)]
    both = collect_statistics(model, batches, progress=False)
    merged = collect_statistics(model, batches[:1], progress=False).merge(
        collect_statistics(model, batches[1:], progress=False)
    )
    for name, tensor in both.sites["block"].tensors().items():
        torch.testing.assert_close(merged.sites["block"].tensors()[name], tensor, rtol=1e-9, atol=1e-12)


def test_unsupported_architecture_names_type_and_supported_list():
    model = tiny_model("llama", num_layers=1)
    model.config.model_type = "mamba"
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba'.*llama"):
        get_adapter(model)


def test_hooks_are_removed_even_when_a_batch_fails():
    model = tiny_model("llama", num_layers=2)
    bad = {"input_ids": torch.full((1, 4), 10_000), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(IndexError):
        collect_statistics(model, [bad], progress=False)
    assert all(
        not block._forward_hooks and not block._forward_pre_hooks for block in get_adapter(model).blocks
    )
