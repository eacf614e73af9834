"""Statistics of models whose weights are spread over devices, and of half-precision models.

There is one CPU device, so a model split across two GPUs cannot be built here. The closest CPU test double
is accelerate's own big-model dispatch: ``dispatch_model`` with a device map that puts alternate blocks (and
the embedding) on "disk" and the others on "cpu". Offloaded weights live on the ``meta`` device and
accelerate's hooks load them at forward time, wrapped around our statistics hooks, exactly as with
``device_map="auto"`` on GPUs. What this cannot exercise is a real cross-device copy: on GPUs each hook
reduces on its block's device and moves only the reduced numbers with ``.to(accumulator device)``, and the
per-device mask cache holds one entry per GPU.
"""

import pytest
import torch
from accelerate import dispatch_model

from _tiny import random_batch, tiny_model
from avss.stats.collect import collect_statistics, execution_device
from avss.stats.distributed import pack

SITES = ("block", "delta", "mlp", "attn")


def _device_map(num_layers: int) -> dict[str, str]:
    blocks = {f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(num_layers)}
    return {
        "model.embed_tokens": "disk",
        **blocks,
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }


def test_dispatched_model_gives_the_single_device_statistics(tmp_path):
    batches = [random_batch(seed=0), random_batch(batch=2, length=9, seed=1)]
    reference = collect_statistics(tiny_model("llama", 4), batches, sites=SITES, progress=False)
    dispatched = dispatch_model(tiny_model("llama", 4), device_map=_device_map(4), offload_dir=str(tmp_path))
    assert next(dispatched.parameters()).device.type == "meta"  # the embedding is offloaded
    assert execution_device(dispatched) == torch.device("cpu")
    got = collect_statistics(dispatched, batches, sites=SITES, progress=False)
    assert torch.equal(pack(got), pack(reference))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_accumulates_in_float64(dtype):
    """Statistics of a bf16/fp16 model equal float64 statistics of its own hidden states, to float32 rounding
    (per-token reductions run in float32, far finer than the activations' own 16-bit rounding)."""
    model = tiny_model("llama", 3).to(dtype)
    batch = random_batch()
    stats = collect_statistics(model, [batch], sites=("block",), progress=False)
    assert stats.sites["block"].mean.dtype == torch.float64
    with torch.no_grad():
        states = model.base_model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    for layer in range(2):  # the last entry of hidden_states has the final norm applied
        values = states[layer + 1][mask].double()
        site = stats.sites["block"]
        assert site.mean[layer].item() == pytest.approx(values.mean().item(), rel=1e-6)
        variance = values.var(unbiased=False).item()
        assert site.variance_elements[layer].item() == pytest.approx(variance, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_per_layer_reductions_never_synchronize_with_the_host():
    """The hooks' work (reduce, cosine, fold) raises under CUDA's sync debug mode if anything syncs."""
    from avss.stats.accumulators import (
        SiteBatch,
        SiteStats,
        Threshold,
        masked_cosine_sum,
        reduce_site,
    )

    thresholds = (Threshold("abs", 1e-5), Threshold("rel", 0.01))
    hidden = torch.randn(2, 7, 16, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 7, dtype=torch.bool, device="cuda")
    site = SiteStats(1, thresholds).to("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        reduced, norms = reduce_site(hidden, mask, thresholds)
        masked_cosine_sum(hidden, hidden, mask, norms, norms)
        site.fold(SiteBatch.stack([reduced], "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow  # torch.compile takes about a minute on 2 CPU cores
def test_compiled_reductions_equal_eager():
    batches = [random_batch(seed=0), random_batch(batch=2, length=9, seed=1)]
    eager = collect_statistics(tiny_model("llama", 3), batches, sites=SITES, progress=False)
    compiled = collect_statistics(tiny_model("llama", 3), batches, sites=SITES, progress=False, compile=True)
    torch.testing.assert_close(pack(compiled), pack(eager), rtol=1e-6, atol=1e-9)
