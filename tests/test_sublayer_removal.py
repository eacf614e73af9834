"""Attention and MLP sublayer removal: in memory it equals zeroing the sublayer's output projection, cached
decoding still works, the saved model reloads with plain from_pretrained and the same logits, budgets convert
at equal parameters, and bad input fails with one line before anything is loaded or changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from _precision import FLOAT32_PATHS
from _tiny import random_batch, tiny_model, tiny_tokenizer
from avss.adapters import get_adapter
from avss.data import CalibrationOptions, TextSource
from avss.errors import PruneConfigError, UnsupportedArchitectureError
from avss.models import LoadedModel
from avss.pruning.prune import PROVENANCE_FILE, prune, save_pruned
from avss.pruning.rules import PruneSpec
from avss.pruning.sublayers import (
    SAVED_NOTE,
    RemovedSublayer,
    equal_parameter_budget,
    equal_parameter_count,
    remove_sublayers,
    removed_sublayers,
    sublayer_parameters,
)
from avss.scorers import context_for, get_scorer

# The projection that writes each sublayer's output, by hand for each family (nothing from the adapter).
OUTPUT_PROJECTION = {
    ("attn", "gpt2"): "attn.c_proj",
    ("mlp", "gpt2"): "mlp.c_proj",
    ("attn", None): "self_attn.o_proj",
    ("mlp", None): "mlp.down_proj",
}
MODEL_TYPES = ("llama", "qwen2", "gemma3_text", "gpt2", "olmo2")
NUM_LAYERS = 6


def output_projection(block: torch.nn.Module, kind: str, model_type: str) -> torch.nn.Module:
    return block.get_submodule(OUTPUT_PROJECTION.get((kind, model_type), OUTPUT_PROJECTION[kind, None]))


def zero_output_projections(model: torch.nn.Module, kind: str, layers: list[int]) -> None:
    for layer in layers:
        projection = output_projection(get_adapter(model).blocks[layer], kind, model.config.model_type)
        with torch.no_grad():
            projection.weight.zero_()
            if projection.bias is not None:
                projection.bias.zero_()


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=FLOAT32_PATHS, atol=FLOAT32_PATHS * scale)


@pytest.mark.parametrize("kind", ["attn", "mlp"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_in_memory_removal_equals_zeroing_the_output_projection(model_type, kind):
    reference, pruned = tiny_model(model_type, NUM_LAYERS), tiny_model(model_type, NUM_LAYERS)
    zero_output_projections(reference, kind, [0, 3])
    held = sum(p.numel() for p in pruned.parameters())
    sizes = sublayer_parameters(pruned, kind)
    removed = remove_sublayers(pruned, kind, [3, 0])
    assert removed == sizes[0] + sizes[3] and sublayer_parameters(pruned, kind) == sizes
    assert sum(p.numel() for p in pruned.parameters()) == held - removed  # gone from memory too
    assert removed_sublayers(pruned) == {"attn": [], "mlp": [], kind: [0, 3]}
    batch = random_batch(3, 12, pad_rows=False)
    assert_float32_close(logits(pruned, batch), logits(reference, batch))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_cached_decoding_equals_a_full_forward_with_block_0_attention_removed(model_type):
    """Models read the tokens seen from layer 0's cache; a removed attention still advances its layer.
    Gemma 3's tiny config has a sliding window of 4, so its local layers' cache wraps too."""
    model = tiny_model(model_type, 4)
    remove_sublayers(model, "attn", [0, 2])
    ids = random_batch(2, 12, pad_rows=False)["input_ids"]
    full = logits(model, {"input_ids": ids})
    with torch.no_grad():
        step = model(input_ids=ids[:, :7], use_cache=True)
        cache = step.cache if hasattr(step, "cache") else step.past_key_values
        pieces = [step.logits]
        for position in range(7, 12):
            step = model(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            cache = step.cache if hasattr(step, "cache") else step.past_key_values
            pieces.append(step.logits)
    assert_float32_close(torch.cat(pieces, dim=1), full)


def calibration() -> CalibrationOptions:
    return CalibrationOptions(samples=4, max_length=16, batch_size=2)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(
        "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(20))
    )
    return path


def test_pruning_removes_the_least_influential_attention_and_saves_a_plain_model(text_file, tmp_path):
    model = tiny_model("llama", NUM_LAYERS)
    loaded = LoadedModel(model, tiny_tokenizer(), {"name": "tiny"})
    source = TextSource(data=str(text_file))
    scorer = get_scorer("attn_influence")
    expected = scorer.score(context_for(model, calibration().batches(loaded.tokenizer, source), [scorer]))
    spec = PruneSpec(fraction=None, n_layers=2, sublayer="attn").check()
    result, selection = prune(loaded, scorer, source, calibration(), spec, progress=False)
    assert selection.removed == sorted(expected.ranking()[:2])
    record = result.record
    assert result.removed == record.removed_layers == [] and result.kept == list(range(NUM_LAYERS))
    assert record.sublayers is not None and record.sublayers["removed"] == selection.removed
    assert (
        record.sublayers["saves_compute_in_saved_files"] is False and record.sublayers["note"] == SAVED_NOTE
    )
    assert record.selection["sublayer"] == "attn"
    batch = random_batch(3, 12)
    in_memory = logits(model, batch)

    out = save_pruned(model, loaded.tokenizer, tmp_path / "pruned", record)
    assert all(
        isinstance(get_adapter(model).sublayer_module(i, "attn"), RemovedSublayer) for i in selection.removed
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_float32_close(logits(reloaded, batch), in_memory)
    original = tiny_model("llama", NUM_LAYERS)
    assert reloaded.num_parameters() == original.num_parameters()  # nothing saved on disk
    tensors = load_file(out / "model.safetensors")
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}.self_attn."
        names = [name for name in tensors if name.startswith(prefix)]
        assert names
        for name in names:
            if layer in selection.removed:
                assert not tensors[name].any(), name
            else:
                assert torch.equal(tensors[name], original.state_dict()[name]), name
    saved = json.loads((out / PROVENANCE_FILE).read_text())
    assert saved["sublayers"]["removed"] == selection.removed and saved["removed_layers"] == []


def test_given_sublayers_need_no_scoring_pass(monkeypatch):
    monkeypatch.setattr(CalibrationOptions, "batches", lambda *a, **k: pytest.fail("no calibration data"))
    model = tiny_model("gpt2", NUM_LAYERS)
    loaded = LoadedModel(model, tiny_tokenizer(), {"name": "tiny"})
    spec = PruneSpec(fraction=None, layers=(5, 1), sublayer="mlp").check()
    result, _ = prune(loaded, None, TextSource(), calibration(), spec, progress=False)
    assert result.record.sublayers["removed"] == [1, 5] and removed_sublayers(model)["mlp"] == [1, 5]
    assert result.record.sublayers["parameters_removed_in_memory"] == 2 * sublayer_parameters(model, "mlp")[0]


def test_equal_parameter_budget_counts_the_models_modules():
    """Tiny llama: width 32, 4 query and 2 key-value heads of 8, MLP width 64, two norms per block."""
    model = tiny_model("llama", 4)
    attention = 32 * 32 + 2 * (32 * 16) + 32 * 32
    block = attention + 3 * 32 * 64 + 2 * 32
    assert sublayer_parameters(model, "attn") == [attention] * 4
    budget = equal_parameter_budget(model, 1)
    assert (budget.block_size, budget.sublayer_size) == (block, attention)
    assert budget.sublayers == round(block / attention) == 3 and budget.feasible
    assert budget.block_parameters == block and budget.sublayer_parameters == 3 * attention
    assert not equal_parameter_budget(model, 2).feasible  # 6 attention sublayers of 4
    assert equal_parameter_budget(model, 1, "mlp").sublayers == round(block / (3 * 32 * 64)) == 2
    remove_sublayers(model, "attn", [1])
    assert equal_parameter_budget(model, 1) == budget  # counted as the model was before removal
    assert equal_parameter_count(8, 4.0, 1.0) == 32 and equal_parameter_count(1, 10.0, 4.0) == 2
    with pytest.raises(PruneConfigError):
        equal_parameter_count(0, 4.0, 1.0)


def test_removal_refuses_bad_input_and_changes_nothing():
    model = tiny_model("llama", 4)
    remove_sublayers(model, "attn", [2])
    cases = [
        ("attn", [4], "block 4 out of range for a 4-block model"),
        ("attn", [1, 1], "list a block twice"),
        ("attn", [2], "the attention sublayer of block 2 is removed"),
        ("attn", [0, 1, 3], "cannot remove 4 of 4 attention sublayers: at least one must remain"),
        ("ffn", [1], "unknown --sublayer 'ffn'; choose one of attn, mlp"),
    ]
    for kind, layers, message in cases:
        with pytest.raises(PruneConfigError, match=message):
            remove_sublayers(model, kind, layers)
    assert removed_sublayers(model) == {"attn": [2], "mlp": []}
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox has no residual stream"):
        remove_sublayers(tiny_model("gpt_neox"), "attn", [1])


def test_spec_refuses_combinations_that_need_removed_blocks():
    for options, iterative, message in [
        ({"sublayer": "attn", "patch": "linear"}, False, "--sublayer cannot be combined with --patch"),
        ({"sublayer": "attn"}, True, "--sublayer cannot be combined with --iterative"),
        ({"sublayer": "heads"}, False, "unknown --sublayer 'heads'"),
    ]:
        with pytest.raises(PruneConfigError, match=message):
            PruneSpec(**options).check(iterative=iterative)


# --- the command line


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model) -> Path:
    return saved_tiny_model(NUM_LAYERS)


def test_cli_removes_attention_sublayers_and_says_what_the_saved_files_save(
    cli, model_dir, text_file, tmp_path
):
    out = tmp_path / "pruned"
    result = cli(
        "prune", model_dir, "--sublayer", "attn", "--method", "attn_influence", "--n-layers", 2,
        "--data", text_file, "--samples", 4, "--max-length", 16, "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stdout = " ".join(result.stdout.split())
    assert "removed the attention sublayers of blocks" in stdout and "all 6 blocks remain" in stdout
    assert "this saves no compute and no parameters" in stdout
    record = json.loads((out / PROVENANCE_FILE).read_text())
    removed = record["sublayers"]["removed"]
    assert len(removed) == 2 and record["method"] == "attn_influence"
    # The saved model is the original one with those attention sublayers removed.
    expected = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    remove_sublayers(expected, "attn", removed)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == NUM_LAYERS
    batch = random_batch(3, 12)
    assert_float32_close(logits(reloaded, batch), logits(expected, batch))


def test_cli_avss_site_follows_the_sublayer(cli, model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    result = cli(
        "prune", model_dir, "--sublayer", "mlp", "--fraction", 0.34, "--data", text_file, "--samples", 4,
        "--max-length", 16, "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["options"]["scorer"]["site"] == "mlp" and len(record["sublayers"]["removed"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sublayer", "heads"], "unknown --sublayer 'heads'; choose one of attn, mlp"),
        (["--sublayer", "attn", "--patch", "linear"], "--sublayer cannot be combined with --patch"),
        (["--sublayer", "attn", "--iterative"], "--sublayer cannot be combined with --iterative"),
        (["--sublayer", "attn", "--heal", "lora"], "drop --heal"),
        (["--sublayer", "attn", "--layers", "1,1"], "--layers lists block 1 twice"),
        (["--sublayer", "attn", "--fraction", "1.5"], "--fraction must be strictly between 0 and 1"),
    ],
)
def test_cli_bad_sublayer_options_exit_2_with_one_line_before_loading(
    cli, model_dir, tmp_path, monkeypatch, argv, message
):
    import avss.cli.core

    monkeypatch.setattr(avss.cli.core, "load_model", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / "pruned"
    result = cli("prune", model_dir, *argv, "--out", out, "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_cli_gguf_out_and_unsupported_architectures_exit_2(cli, tmp_path, monkeypatch, capsys):
    import avss.cli.core

    monkeypatch.setattr(avss.cli.core, "load_model", lambda *a, **k: pytest.fail("loaded"))
    result = cli("prune", "model", "--sublayer", "attn", "--out", tmp_path / "x.gguf")
    assert result.returncode == 2 and "drop the .gguf --out" in result.stderr
    monkeypatch.undo()
    neox = tmp_path / "neox"
    tiny_model("gpt_neox").save_pretrained(neox)
    tiny_tokenizer().save_pretrained(neox)
    capsys.readouterr()  # the save's progress bar is not the command's output
    result = cli("prune", neox, "--sublayer", "attn", "--out", tmp_path / "out", "--device", "cpu")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "gpt_neox has no residual stream between its attention and MLP sublayers" in errors[0]
    assert not (tmp_path / "out").exists()
