"""Slow tier: score and prune the real embedded models (run with `pytest -m slow`)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from avss.data import CalibrationOptions, TextSource
from avss.models import load_model
from avss.pruning.prune import prune, save_pruned
from avss.pruning.rules import PruneSpec
from avss.scorers import get_scorer
from avss.scorers.run import score

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "num_layers"), [("smollm2-135m", 30), ("gemma3-270m", 18)])
def test_score_prune_save_reload(tmp_path, name, num_layers):
    loaded = load_model(name, device="cpu")
    calibration = CalibrationOptions(samples=8, max_length=128)
    run = score(loaded, calibration=calibration, progress=False)
    assert run.scores.num_layers == num_layers
    assert torch.isfinite(run.scores.avss).all()
    spec = PruneSpec(fraction=0.25)
    result, _ = prune(loaded, get_scorer("avss"), TextSource(), calibration, spec, progress=False)
    assert len(result.removed) == round(0.25 * num_layers) and result.removed == spec.select(run.scores.avss)
    save_pruned(loaded.model, loaded.tokenizer, tmp_path / "pruned", result.record)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    prompt = loaded.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**prompt).logits, loaded.model(**prompt).logits)
        generated = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


@pytest.mark.parametrize(
    ("name", "num_layers", "max_perplexity"),
    [("qwen2.5-coder-0.5b", 24, 60.0), ("qwen2.5-coder-1.5b", 28, 30.0)],
)
def test_large_embedded_models_assemble_load_and_model_text(name, num_layers, max_perplexity):
    """Parts assembled and checked (sha256), converted, loaded; perplexity on the bundled evaluation text is
    that of a working model (a broken conversion gives thousands; measured 34 and 13 on 16 paragraphs)."""
    from avss.adapters import get_adapter
    from avss.evaluation import evaluate
    from avss.models import EMBEDDED_MODELS, package_dir

    split = EMBEDDED_MODELS[name].split
    if any(package_dir(package) is None for package, _ in split.parts):
        pytest.skip(f"{name} is not installed: make models-large")
    loaded = load_model(name, device="cpu")
    assert loaded.source["model_type"] == "qwen2" and loaded.source["sha256"] == split.sha256
    assert get_adapter(loaded.model).num_layers == num_layers
    result = evaluate(loaded.model, loaded.tokenizer, ["perplexity"], limit=8, max_length=512)
    perplexity = result.metrics["perplexity"]["perplexity"]
    assert 1.0 < perplexity < max_perplexity, perplexity
