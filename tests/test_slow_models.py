"""Slow tier: score and prune the real embedded models (run with `pytest -m slow`)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from avss.models import load_model
from avss.pipeline import CalibrationOptions, prune, save, score
from avss.prune import PruneSpec

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "num_layers"), [("smollm2-135m", 30), ("gemma3-270m", 18)])
def test_score_prune_save_reload(tmp_path, name, num_layers):
    loaded = load_model(name, device="cpu")
    run = score(loaded, calibration=CalibrationOptions(samples=8, max_length=128), progress=False)
    assert run.scores.num_layers == num_layers
    assert torch.isfinite(run.scores.avss).all()
    result = prune(loaded, run, PruneSpec(fraction=0.25))
    assert len(result.removed) == round(0.25 * num_layers)
    save(loaded, result, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    prompt = loaded.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**prompt).logits, loaded.model(**prompt).logits)
        generated = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
