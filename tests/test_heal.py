"""Healing after pruning on tiny random models: losses go down, only the intended weights move, LoRA merges
exactly, replacement blocks sit where the removed span was, and healed directories reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from _tiny import killed_after_checkpoint, random_batch, tiny_model, tiny_tokenizer
from avss.adapters import get_adapter, remove_layers
from avss.cli._app import app
from avss.data import TextSource, bundled_text, split_paragraphs
from avss.errors import DataError, HealConfigError
from avss.healing.heal import HEALING_FILE, HealConfig, heal, heal_in_memory
from avss.healing.methods import lm_loss, neighbour_layers
from avss.healing.replace import ReplacementStudents, SpanTeacher, plan_replacements
from avss.pruning.prune import PruningRecord, save_pruned
from avss.pruning.rules import contiguous_spans
from avss.training import CHECKPOINT_FILE

REMOVED = [1, 2, 4]
NUM_LAYERS = 6
TEXTS = split_paragraphs(bundled_text("calibration"))


def config(method: str, **overrides) -> HealConfig:
    values = dict(method=method, steps=6, epochs=2, batch_size=2, max_length=24, validation_samples=4)
    values["learning_rate"] = {"lora": 1e-2, "full": 3e-3, "replace": 3e-3}[method]
    return HealConfig(**{**values, **overrides})


def pruned_pair(model_type: str = "llama") -> tuple[torch.nn.Module, torch.nn.Module]:
    original = tiny_model(model_type, NUM_LAYERS)
    pruned = copy.deepcopy(original)
    remove_layers(pruned, REMOVED)
    return original, pruned


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_spans_neighbours_and_replacement_plan():
    assert contiguous_spans([4, 1, 2, 7]) == [(1, 2), (4, 4), (7, 7)]
    # kept: 0 3 5 6 8 -> positions 0..4; spans (1,2), (4,4), (7,7)
    assert neighbour_layers([1, 2, 4, 7], 9) == [0, 1, 2, 3, 4]
    assert neighbour_layers([0, 1], 5) == [0]
    assert neighbour_layers([2], 6, width=2) == [0, 1, 2, 3]
    plans = plan_replacements([0, 3, 4], 7)
    assert [(p.first, p.last, p.template, p.insert_at) for p in plans] == [(0, 0, 1, 0), (3, 4, 2, 3)]


@pytest.mark.parametrize(
    ("method", "model_type"), [("lora", "llama"), ("full", "llama"), ("lora", "olmo2"), ("lora", "gpt2")]
)
def test_healing_lowers_the_calibration_loss(method, model_type, tokenizer):
    # olmo2 normalizes after attention and MLP (no pre-MLP norm); gpt2's projections are Conv1D.
    _, pruned = pruned_pair(model_type)
    batches = [random_batch(seed=s) for s in range(2)]
    result = heal_in_memory(pruned, tokenizer, REMOVED, TEXTS, config(method), progress=False)
    losses = result.record.training["val_loss"]
    assert min(losses[1:]) < losses[0]
    assert result.record.training["trainable_parameters"] > 0
    assert all(torch.isfinite(lm_loss(result.model, batch)) for batch in batches)


def test_full_changes_only_the_neighbouring_blocks(tokenizer):
    _, pruned = pruned_pair()
    before = {name: p.detach().clone() for name, p in pruned.named_parameters()}
    result = heal_in_memory(pruned, tokenizer, REMOVED, TEXTS, config("full"), progress=False)
    trained = {f"model.layers.{layer}." for layer in neighbour_layers(REMOVED, NUM_LAYERS)}
    assert result.record.trained_layers == [0, 1, 2]
    for name, parameter in result.model.named_parameters():
        moved = not torch.equal(parameter, before[name])
        assert moved == name.startswith(tuple(trained)) or (not moved and "norm" in name), name


def test_lora_changes_only_target_modules_of_neighbouring_blocks(tokenizer):
    original = tiny_model("llama", 8)
    pruned = copy.deepcopy(original)
    remove_layers(pruned, [3])  # kept 0 1 2 4 5 6 7 -> neighbours are pruned blocks 2 and 3
    before = {name: p.detach().clone() for name, p in pruned.named_parameters()}
    heal_config = config("lora", target_modules=("q_proj", "v_proj"))
    result = heal_in_memory(pruned, tokenizer, [3], TEXTS, heal_config, progress=False)
    assert result.record.trained_layers == [2, 3]
    moved = {name for name, p in result.model.named_parameters() if not torch.equal(p, before[name])}
    expected = {
        f"model.layers.{layer}.self_attn.{proj}.weight" for layer in (2, 3) for proj in ("q_proj", "v_proj")
    }
    assert moved == expected


def test_merged_and_unmerged_lora_give_the_same_logits(tokenizer):
    _, pruned = pruned_pair()
    result = heal_in_memory(pruned, tokenizer, REMOVED, TEXTS, config("lora", merge=False), progress=False)
    assert not result.record.merged
    batch = random_batch()
    unmerged = logits(result.model, batch)
    merged = copy.deepcopy(result.model).merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged, batch), unmerged, atol=1e-5, rtol=1e-5)
    with result.model.disable_adapter():
        assert not torch.allclose(logits(result.model, batch), unmerged, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_replacement_training_reduces_its_mse_and_is_inserted_where_the_span_was(model_type, tokenizer):
    original, pruned = pruned_pair(model_type)
    plans = plan_replacements(REMOVED, NUM_LAYERS)
    probe = ReplacementStudents(
        SpanTeacher(original, plans), [copy.deepcopy(get_adapter(original).blocks[p.template]) for p in plans]
    )
    batch = random_batch()
    with torch.no_grad():
        untrained = float(probe(batch))
    result = heal_in_memory(
        pruned, tokenizer, REMOVED, TEXTS, config("replace"), teacher=original, progress=False
    )
    losses = result.record.training["val_loss"]
    assert min(losses[1:]) < losses[0]
    healed = result.model
    adapter = get_adapter(healed)
    assert adapter.num_layers == NUM_LAYERS - len(REMOVED) + len(plans)
    assert result.record.inserted_layers == [1, 3]  # 0 [1-2] 3 [4] 5 -> 0 R 3 R 5
    layer_types = getattr(healed.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == adapter.num_layers
        assert (
            layer_types[1] == original.config.layer_types[0]
            and layer_types[3] == original.config.layer_types[3]
        )
    for index, block in enumerate(adapter.blocks):
        assert all(getattr(m, "layer_idx", index) == index for m in block.modules())
    # The untouched kept blocks keep their weights; the inserted ones are the trained students.
    old_adapter = get_adapter(original)
    trained = ReplacementStudents(SpanTeacher(original, plans), [adapter.blocks[1], adapter.blocks[3]])
    with torch.no_grad():
        assert float(trained(batch)) < untrained
    for new, old in ((0, 0), (2, 3), (4, 5)):
        for (name, p), q in zip(
            adapter.blocks[new].named_parameters(), old_adapter.blocks[old].parameters(), strict=True
        ):
            assert torch.equal(p, q), name


def test_inserted_block_sees_in_the_healed_model_what_it_was_trained_on(tokenizer):
    """The first replacement's output inside the healed model equals its training-time prediction."""
    original, pruned = pruned_pair("gemma3_text")
    result = heal_in_memory(
        pruned, tokenizer, REMOVED, TEXTS, config("replace", steps=2), teacher=original, progress=False
    )
    healed_blocks = get_adapter(result.model).blocks
    outputs = {}
    handle = healed_blocks[1].register_forward_hook(lambda m, a, o: outputs.setdefault("h", o))
    batch = random_batch(pad_rows=False)
    logits(result.model, batch)
    handle.remove()
    plans = plan_replacements(REMOVED, NUM_LAYERS)[:1]
    students = ReplacementStudents(SpanTeacher(original, plans), [healed_blocks[1]])
    captured = students._teacher.capture(batch)
    from avss.healing.replace import _with_hidden

    args, kwargs = _with_hidden(*captured["call", plans[0].template], captured["input", plans[0].first])
    with torch.no_grad():
        expected = healed_blocks[1](*args, **kwargs)
    torch.testing.assert_close(outputs["h"], expected, atol=1e-5, rtol=1e-5)


def save_tiny_pruned(tmp_path, model_type: str = "llama"):
    tokenizer = tiny_tokenizer()
    original = tiny_model(model_type, NUM_LAYERS)
    original_dir = tmp_path / "original"
    original.save_pretrained(original_dir)
    tokenizer.save_pretrained(original_dir)
    pruned = copy.deepcopy(original)
    kept = remove_layers(pruned, REMOVED)
    record = PruningRecord(
        source_model={"name": "original", "kind": "directory", "path": str(original_dir)},
        removed_layers=REMOVED,
        kept_layers=kept,
        original_num_layers=NUM_LAYERS,
        method="manual",
        selection={},
    )
    return save_pruned(pruned, tokenizer, tmp_path / "pruned", record)


@pytest.mark.parametrize("method", ["replace", "lora", "full"])
def test_healed_directory_reloads_with_from_pretrained(method, tmp_path):
    pruned_dir = save_tiny_pruned(tmp_path, "gemma3_text")
    out = tmp_path / "healed"
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS), encoding="utf-8")
    result = heal(pruned_dir, out, config(method, steps=4), TextSource(data=str(data)), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = random_batch()
    torch.testing.assert_close(logits(reloaded, batch), logits(result.model, batch), atol=1e-5, rtol=1e-5)
    record = json.loads((out / HEALING_FILE).read_text())
    assert record["method"] == method and record["pruning"]["removed_layers"] == REMOVED
    assert record["data"]["kind"] == "file" and record["training"]["steps"] == 4
    assert (record["teacher_model"] is not None) == (method == "replace")
    assert not (tmp_path / "healed.checkpoint").exists()


def test_killed_heal_resumes_from_the_checkpoint_beside_the_output(tmp_path):
    pruned_dir = save_tiny_pruned(tmp_path)
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS), encoding="utf-8")
    source, out = TextSource(data=str(data)), tmp_path / "healed"
    settings = dict(steps=4, patience=None)
    straight = heal(pruned_dir, tmp_path / "straight", config("full", **settings), source, progress=False)
    with killed_after_checkpoint():
        heal(pruned_dir, out, config("full", **settings), source, progress=False)
    assert (tmp_path / "healed.checkpoint" / CHECKPOINT_FILE).is_file() and not out.exists()
    resumed = heal(pruned_dir, out, config("full", **settings, resume=True), source, progress=False)
    assert resumed.record.training["resumed_from_epoch"] == 1
    assert resumed.record.training["val_loss"] == straight.record.training["val_loss"]
    batch = random_batch()
    torch.testing.assert_close(logits(resumed.model, batch), logits(straight.model, batch))
    assert not (tmp_path / "healed.checkpoint").exists(), "a finished run removes its checkpoint"


def test_unmerged_lora_saves_an_adapter_for_the_pruned_directory(tmp_path):
    from peft import AutoPeftModelForCausalLM

    pruned_dir = save_tiny_pruned(tmp_path)
    out = tmp_path / "adapter"
    result = heal(pruned_dir, out, config("lora", steps=4, merge=False), progress=False)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    batch = random_batch()
    torch.testing.assert_close(logits(reloaded, batch), logits(result.model, batch), atol=1e-5, rtol=1e-5)


def test_heal_refuses_evaluation_text_unknown_methods_and_unpruned_models(tmp_path, tokenizer):
    pruned_dir = save_tiny_pruned(tmp_path)
    with pytest.raises(DataError, match="evaluation"):
        heal(pruned_dir, tmp_path / "x", config("lora"), TextSource(bundled="evaluation"), progress=False)
    with pytest.raises(HealConfigError, match="unknown healing method"):
        heal(pruned_dir, tmp_path / "x", HealConfig(method="magic"), progress=False)
    with pytest.raises(HealConfigError, match=r"no avss_pruning\.json"):
        heal(tmp_path, tmp_path / "x", config("lora"), progress=False)
    with pytest.raises(HealConfigError, match="nothing was removed"):
        heal_in_memory(tiny_model("llama", 2), tokenizer, [], TEXTS, config("lora"), progress=False)
    with pytest.raises(HealConfigError, match="teacher"):
        heal_in_memory(pruned_pair()[1], tokenizer, REMOVED, TEXTS, config("replace"), progress=False)


def test_cli_heal(tmp_path):
    pruned_dir = save_tiny_pruned(tmp_path)
    out = tmp_path / "healed"
    args = ["heal", str(pruned_dir), "--out", str(out), "--method", "full", "--steps", "2", "--epochs", "1"]
    options = ["--max-length", "32", "--validation-samples", "4", "--autocast", "bf16"]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.output
    training = json.loads((out / HEALING_FILE).read_text())["training"]
    assert training["autocast_dtype"] == "bfloat16" and training["config"]["autocast"] == "bf16"


def test_cli_prune_with_heal(tmp_path):
    source = save_tiny_pruned(tmp_path).parent / "original"
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "pruned-healed"
    args = ["prune", str(source), "--out", str(out), "--n-layers", "2", "--heal", "lora", "--heal-steps", "2"]
    result = CliRunner().invoke(app, [*args, "--data", str(data), "--samples", "4", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / HEALING_FILE).read_text())
    assert record["method"] == "lora" and record["merged"] and len(record["pruning"]["removed_layers"]) == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == NUM_LAYERS - 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "replace"])
def test_heal_smollm2_end_to_end(method, tmp_path):
    """The embedded SmolLM2 pruned by two blocks, healed for a few steps, saved and reloaded."""
    from avss.models import load_model

    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    kept = remove_layers(loaded.model, [10, 11])
    record = PruningRecord(loaded.source, [10, 11], kept, 30, "manual", {})
    pruned_dir = save_pruned(loaded.model, loaded.tokenizer, tmp_path / "pruned", record)
    heal_config = HealConfig(
        method=method, steps=2, epochs=1, batch_size=2, max_length=64, validation_samples=2
    )
    result = heal(pruned_dir, tmp_path / "healed", heal_config, progress=False)
    assert get_adapter(result.model).num_layers == 28 + (method == "replace")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    batch = loaded.tokenizer(["The cat sat on the mat."], return_tensors="pt")
    torch.testing.assert_close(
        logits(reloaded, dict(batch)), logits(result.model, dict(batch)), atol=1e-4, rtol=1e-4
    )
