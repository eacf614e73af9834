"""Slow tier: ``--patch linear`` on the real SmolLM2-135M (run with ``pytest -m slow``)."""

import copy

import pytest

import avss
from avss.adapters import remove_layers
from avss.data import CalibrationOptions, TextSource
from avss.pruning.prune import prune
from avss.pruning.rules import PruneSpec
from avss.scorers import get_scorer

pytestmark = pytest.mark.slow


def test_patched_smollm2_has_lower_perplexity_than_the_same_pruning_unpatched():
    """25% of the blocks removed by block influence; the patched model's perplexity on the bundled
    evaluation text (held apart from the calibration text the patch is fitted on) is the lower one.
    benchmarks/patch_smollm2.md has the measured figures."""
    loaded = avss.load_model("smollm2-135m", device="cpu")
    unpatched = copy.deepcopy(loaded.model)
    calibration = CalibrationOptions(samples=32, max_length=256)
    spec = PruneSpec(fraction=0.25, patch="linear")
    result, _ = prune(loaded, get_scorer("block_influence"), TextSource(), calibration, spec, progress=False)
    assert len(result.removed) == 8 and 0 not in result.removed
    remove_layers(unpatched, result.removed)
    assert unpatched.num_parameters() == loaded.model.num_parameters()
    ppl = {
        name: avss.evaluate(model, loaded.tokenizer, ["perplexity"]).tasks["perplexity"].metrics["perplexity"]
        for name, model in (("unpatched", unpatched), ("patched", loaded.model))
    }
    assert ppl["patched"] < ppl["unpatched"], ppl
    for run in result.record.patch["runs"]:
        assert run["fit_error"] < run["unpatched_error"]
