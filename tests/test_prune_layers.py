"""`avss prune --layers`: remove exactly the given blocks through the one pruning path, without scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from _tiny import random_batch, tiny_model, tiny_tokenizer
from avss.data import CalibrationOptions, TextSource
from avss.errors import PruneConfigError
from avss.models import LoadedModel
from avss.pruning.prune import GIVEN, PROVENANCE_FILE, PRUNING_FORMAT, prune
from avss.pruning.rules import PruneSpec, parse_layers

NUM_LAYERS = 6


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model) -> Path:
    return saved_tiny_model(NUM_LAYERS)


def test_parse_layers():
    assert parse_layers("3,5, 21") == (3, 5, 21)
    for text in ("3,a", "3,,5", "1.5", ""):
        with pytest.raises(PruneConfigError, match="comma-separated block indices"):
            parse_layers(text)


def test_given_blocks_are_removed_without_a_scoring_pass(monkeypatch):
    """The kept blocks are the original ones, weights untouched, and no calibration batch is built."""
    import avss.pruning.prune

    model = tiny_model("llama", NUM_LAYERS)
    original = [block.state_dict() for block in model.model.layers]
    reference = tiny_model("llama", NUM_LAYERS)
    monkeypatch.setattr(avss.pruning.prune, "context_for", lambda *a, **k: pytest.fail("no scoring pass"))
    monkeypatch.setattr(CalibrationOptions, "batches", lambda *a, **k: pytest.fail("no calibration data"))
    loaded = LoadedModel(model, tiny_tokenizer(), {"name": "tiny"})
    spec = PruneSpec(fraction=None, layers=(4, 1, 2)).check()
    result, selection = prune(loaded, None, TextSource(), CalibrationOptions(), spec)
    assert result.removed == [1, 2, 4] and result.kept == [0, 3, 5]
    assert selection.method == GIVEN and selection.steps == []
    kept_blocks = list(model.model.layers)
    for block, layer in zip(kept_blocks, result.kept, strict=True):
        for name, tensor in block.state_dict().items():
            torch.testing.assert_close(tensor, original[layer][name], rtol=0, atol=0)
    # The same as dropping those blocks by hand from an identical model.
    reference.model.layers = torch.nn.ModuleList(reference.model.layers[i] for i in (0, 3, 5))
    reference.config.num_hidden_layers = 3
    batch = random_batch(2, 8, pad_rows=False)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch, use_cache=False).logits, reference(**batch, use_cache=False).logits
        )
    record = result.record
    assert record.method == "layers" and record.selection["layers"] == (4, 1, 2)
    assert record.scores == [] and record.options["num_tokens"] == 0 and record.options["scorer"] is None


def test_cli_removes_exactly_the_given_blocks(cli, model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = cli("prune", model_dir, "--layers", "1,4", "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "removed layers [1, 4]" in result.stdout
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["method"] == "layers"
    assert record["selection"]["layers"] == [1, 4]
    assert record["removed_layers"] == [1, 4] and record["kept_layers"] == [0, 2, 3, 5]
    assert record["command"] and record["format"] == PRUNING_FORMAT  # provenance like every other selection
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == NUM_LAYERS - 2
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.testing.assert_close(
        reloaded.model.layers[1].mlp.down_proj.weight, original.model.layers[2].mlp.down_proj.weight
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "1,6"], "--layers block 6 out of range for a 6-block model (blocks 0-5)"),
        (["--layers", "-1,2"], "--layers block -1 is negative"),
        (["--layers", "2,3,2"], "--layers lists block 2 twice"),
        (["--layers", "0,1,2,3,4,5"], "--layers lists all 6 blocks of the model"),
        (["--layers", "1,x"], "--layers takes comma-separated block indices such as 3,5,21; got 'x'"),
        (["--layers", "1", "--fraction", "0.5"], "drop --fraction (they choose blocks by score)"),
        (["--layers", "1", "--n-layers", "2", "--method", "angular"], "drop --n-layers, --method"),
        (["--layers", "1", "--iterative"], "drop --iterative"),
        (["--layers", "1", "--site", "mlp"], "drop --site"),
    ],
)
def test_bad_layer_lists_exit_2_with_one_line(cli, model_dir, tmp_path, monkeypatch, argv, message):
    import avss.cli.core

    loads = []
    monkeypatch.setattr(avss.cli.core, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    out = tmp_path / "pruned"
    result = cli("prune", model_dir, *argv, "--out", out, "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and loads == []  # validated before the model loads (its config is at hand)
    assert list(tmp_path.iterdir()) == []


def test_range_is_checked_after_loading_when_the_config_is_not_at_hand(monkeypatch):
    """A model whose block count is unknown before loading (a hub id, a GGUF not converted yet) is checked
    right after loading, before anything is built from the data."""
    monkeypatch.setattr(CalibrationOptions, "batches", lambda *a, **k: pytest.fail("no calibration data"))
    loaded = LoadedModel(tiny_model("llama", 4), tiny_tokenizer())
    spec = PruneSpec(fraction=None, layers=(1, 4)).check()
    with pytest.raises(PruneConfigError, match="block 4 out of range for a 4-block model"):
        prune(loaded, None, TextSource(), CalibrationOptions(), spec)
    assert len(loaded.model.model.layers) == 4


def test_layers_exclude_budget_options_in_the_api():
    """Refused as the spec is made, before anything loads; iterative selection when it is asked for."""
    for options in ({"layers": (1,), "n_layers": 2}, {"layers": (1,), "rule": "mass"}):
        with pytest.raises(PruneConfigError, match="cannot be combined"):
            PruneSpec(**options)
    with pytest.raises(PruneConfigError, match="cannot be combined"):
        PruneSpec(layers=(1,)).check(iterative=True)
    with pytest.raises(PruneConfigError, match="at least one block"):
        PruneSpec(layers=())
