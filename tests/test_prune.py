"""Selection rules, layer removal, and pruned models that reload and generate."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from _tiny import random_batch, tiny_model, tiny_tokenizer
from avss.adapters import get_adapter, remove_layers
from avss.errors import OutputError, PruneConfigError
from avss.pruning.prune import PROVENANCE_FILE, PruningRecord, save_pruned
from avss.pruning.rules import PruneSpec, layers_for_fraction, protected_layers, select_count, select_mass

SCORES = torch.tensor([0.30, 0.05, 0.20, 0.10, 0.35], dtype=torch.float64)


def test_count_rule_removes_lowest_scores():
    assert select_count(SCORES, 2) == [1, 3]
    assert select_count(SCORES, 2, protect={1}) == [2, 3]
    assert PruneSpec(fraction=0.4).select(SCORES) == [1, 3]
    assert PruneSpec(n_layers=3).select(SCORES) == [1, 2, 3]


def test_mass_rule_sorts_before_accumulating():
    # sorted shares: .05 (1), .10 (3), .20 (2), ... cumulative .05, .15, .35
    assert select_mass(SCORES, 0.15) == [1, 3]
    assert select_mass(SCORES, 0.36) == [1, 2, 3]
    assert PruneSpec(rule="mass", tau=0.16, protect=("1",)).select(SCORES) == [3]


def test_protect_first_and_last():
    assert protected_layers(5, ("first", "last")) == {0, 4}
    assert PruneSpec(n_layers=4, protect=("first",)).select(SCORES) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(fraction=0.0), "strictly between 0 and 1"),
        (dict(fraction=1.0), "strictly between 0 and 1"),
        (dict(fraction=0.05), "rounds to 0"),
        (dict(n_layers=5), "between 1 and 4"),
        (dict(n_layers=4, protect=("first", "last")), "at least one layer must remain"),
        (dict(rule="mass", tau=0.01), "nothing to remove"),
        (dict(rule="mass", tau=1.0), "every layer"),
        (dict(rule="mass", tau=1.5), r"in \(0, 1\]"),
        (dict(rule="nope"), "unknown --rule"),
        (dict(protect=("middle",)), "cannot protect"),
    ],
)
def test_impossible_prune_requests(options, message):
    """Refused when the spec is made (what it gets wrong alone) or when it meets the scores (the depth)."""
    with pytest.raises(PruneConfigError, match=message):
        PruneSpec(**options).select(SCORES)


def test_fraction_rounding():
    assert layers_for_fraction(0.25, 30) == 8
    assert layers_for_fraction(0.25, 18) == 4


def _record(removed, kept):
    return PruningRecord({"name": "tiny"}, removed, kept, len(removed) + len(kept), "avss", {"rule": "count"})


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gemma2", "qwen2", "gpt2", "opt", "phi3"])
def test_pruned_model_reloads_with_identical_logits_and_generates(tmp_path, model_type):
    model = tiny_model(model_type, num_layers=6)
    tokenizer = tiny_tokenizer()
    kept = remove_layers(model, [1, 4])
    assert kept == [0, 2, 3, 5]
    adapter = get_adapter(model)
    assert adapter.num_layers == 4
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 4
    save_pruned(model, tokenizer, tmp_path / "pruned", _record([1, 4], kept))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert get_adapter(reloaded).num_layers == 4
    batch = random_batch(batch=2, length=10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    prompt = tokenizer(["Hello there"], return_tensors="pt")
    with torch.no_grad():
        cached = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    provenance = json.loads((tmp_path / "pruned" / PROVENANCE_FILE).read_text())
    assert provenance["removed_layers"] == [1, 4]


def test_layer_idx_renumbered_for_kv_cache():
    model = tiny_model("llama", num_layers=5)
    remove_layers(model, [0, 2])
    assert [block.self_attn.layer_idx for block in get_adapter(model).blocks] == [0, 1, 2]


def test_save_refuses_non_empty_output_without_overwrite(tmp_path):
    model = tiny_model("llama", num_layers=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="--overwrite"):
        save_pruned(model, None, out, _record([], [0, 1]))
    assert (out / "keep.txt").read_text() == "precious"
    save_pruned(model, None, out, _record([], [0, 1]), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_save_leaves_no_partial_output(tmp_path, monkeypatch):
    model = tiny_model("llama", num_layers=2)

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", explode)
    with pytest.raises(OutputError, match="No space left"):
        save_pruned(model, None, tmp_path / "out", _record([], [0, 1]))
    assert list(tmp_path.iterdir()) == []
