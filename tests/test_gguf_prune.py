"""GGUF in, GGUF out: a tiny random llama and gemma3 written as GGUF, pruned without dequantizing, reloaded.

The reference is the same file loaded the way avss loads any GGUF (dequantized by transformers) and pruned
through the Hugging Face path (``remove_layers``). Both sides dequantize the same bytes, so their logits
are compared exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from _tiny import random_batch
from _tiny_gguf import tiny_gguf
from avss import errors
from avss.adapters import remove_layers
from avss.models import load_model
from avss.pruning.gguf import (
    MetadataEntry,
    hf_config_overrides,
    plan_metadata,
    plan_tensors,
    prune_gguf,
    sidecar_path,
)
from avss.pruning.prune import PRUNING_FORMAT
from test_provenance import assert_stamped

NUM_LAYERS = 6
REMOVED = [1, 4]
KEPT = [0, 2, 3, 5]
FAST = ["--samples", "2", "--max-length", "16", "--batch-size", "2", "--device", "cpu"]
RECORD = {"original_num_layers": NUM_LAYERS, "removed_layers": REMOVED, "kept_layers": KEPT, "method": "test"}


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf(request.param, tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", NUM_LAYERS)


def reload(path: Path) -> torch.nn.Module:
    """``from_pretrained(dir, gguf_file=name)``, with the per-layer config fields transformers' GGUF loader
    does not read (a pruned Gemma's ``layer_types``) passed as a config, as avss's own loader does."""
    kwargs = {}
    if overrides := hf_config_overrides(path):
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        for key, value in overrides.items():
            setattr(config, key, value)
        kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs
    )
    return model.eval()


def hf_pruned_logits(path: Path, removed: list[int]) -> tuple[torch.Tensor, list | None]:
    loaded = load_model(str(path), device="cpu")
    remove_layers(loaded.model, removed)
    with torch.no_grad():
        logits = loaded.model(**random_batch()).logits
    return logits, getattr(loaded.model.config, "layer_types", None)


def test_pruned_gguf_reloads_with_the_hf_path_logits(source: Path, tmp_path: Path) -> None:
    out = prune_gguf(source, tmp_path / "pruned.gguf", KEPT, RECORD)
    reference, layer_types = hf_pruned_logits(source, REMOVED)
    model = reload(out)
    assert model.config.num_hidden_layers == len(KEPT)
    assert getattr(model.config, "layer_types", None) == layer_types
    with torch.no_grad():
        torch.testing.assert_close(model(**random_batch()).logits, reference, rtol=0, atol=0)


def test_kept_tensors_are_copied_byte_for_byte(source: Path, tmp_path: Path) -> None:
    out = prune_gguf(source, tmp_path / "pruned.gguf", KEPT, RECORD)
    before = {t.name: t for t in gguf.GGUFReader(source).tensors}
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    expected = dict(plan_tensors(list(before), KEPT))
    assert sorted(after) == sorted(expected.values())
    assert not any(name.startswith(f"blk.{len(KEPT)}.") for name in after)
    types = set()
    for old, new in expected.items():
        assert after[new].tensor_type == before[old].tensor_type, new
        assert after[new].data.tobytes() == before[old].data.tobytes(), new
        types.add(before[old].tensor_type.name)
    assert {"Q8_0", "F16", "F32"} <= types


def test_metadata_follows_the_kept_blocks(source: Path, tmp_path: Path) -> None:
    out = prune_gguf(source, tmp_path / "pruned.gguf", KEPT, RECORD)
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(out)
    arch = after.get_field("general.architecture").contents()
    assert after.get_field(f"{arch}.block_count").contents() == len(KEPT)
    for key, field in before.fields.items():
        if key.startswith("GGUF.") or key.endswith(".block_count"):
            continue
        assert after.get_field(key).contents() == field.contents(), key  # tokenizer and the rest kept
    pattern = after.get_field(f"{arch}.attention.sliding_window_pattern")
    if arch == "gemma3":  # period 6: layer 5 is the global one, and it stays global at position 3
        assert pattern.contents() == [True, True, True, False]
        assert pattern.types[-1] == gguf.GGUFValueType.BOOL
    else:
        assert pattern is None
    assert json.loads(after.get_field("avss.pruning").contents()) == RECORD
    assert after.get_field("avss.removed_layers").contents() == REMOVED
    sidecar = json.loads(sidecar_path(out).read_text())
    assert {k: sidecar[k] for k in RECORD} == RECORD
    assert sidecar["gguf"]["tensors_replaced"] == {}


def entries(**values: object) -> list[MetadataEntry]:
    kinds = gguf.GGUFValueType
    out = [MetadataEntry("general.architecture", "llama", kinds.STRING)]
    for key, value in values.items():
        if isinstance(value, list):
            out.append(MetadataEntry(f"llama.{key}", value, kinds.ARRAY, kinds.UINT32))
        else:
            out.append(MetadataEntry(f"llama.{key}", value, kinds.UINT32))
    return out


def test_every_per_layer_array_is_sliced() -> None:
    plan = plan_metadata(
        entries(
            block_count=4,
            **{"attention.head_count": [1, 2, 3, 4], "feed_forward_length": [10, 20, 30, 40]},
            **{"rope.dimension_sections": [5, 6, 7]},
        ),
        [0, 3],
    )
    values = {entry.key: entry.value for entry in plan}
    assert values["llama.block_count"] == 2
    assert values["llama.attention.head_count"] == [1, 4]
    assert values["llama.feed_forward_length"] == [10, 40]
    assert values["llama.rope.dimension_sections"] == [5, 6, 7]


def test_a_scalar_swa_period_becomes_the_kept_layers_array() -> None:
    kinds = gguf.GGUFValueType
    plan = plan_metadata(
        [
            MetadataEntry("general.architecture", "gemma3", kinds.STRING),
            MetadataEntry("gemma3.block_count", 8, kinds.UINT32),
            MetadataEntry("gemma3.attention.sliding_window", 512, kinds.UINT32),
            MetadataEntry("gemma3.attention.sliding_window_pattern", 4, kinds.UINT32),
        ],
        [0, 3, 4, 7],
    )
    values = {entry.key: entry.value for entry in plan}
    assert values["gemma3.attention.sliding_window_pattern"] == [True, False, True, False]


def test_an_unknown_array_of_block_count_values_is_refused() -> None:
    with pytest.raises(errors.GgufError, match=r"llama\.mystery_per_block"):
        plan_metadata(entries(block_count=3, mystery_per_block=[1, 2, 3]), [0, 2])


@pytest.mark.parametrize("kind", ["F32", "F16"])
def test_replacement_tensors_are_written_as_float(source: Path, tmp_path: Path, kind: str) -> None:
    name = "blk.1.ffn_down.weight"  # original block 2
    shape = tuple(
        int(d) for d in reversed(next(t for t in gguf.GGUFReader(source).tensors if t.name == name).shape)
    )
    value = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = prune_gguf(
        source, tmp_path / "patched.gguf", KEPT, RECORD, replacements={name: value}, replacement_type=kind
    )
    tensor = next(t for t in gguf.GGUFReader(out).tensors if t.name == name)
    assert tensor.tensor_type.name == kind
    written = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    tolerance = 0.0 if kind == "F32" else 2.0**-11
    torch.testing.assert_close(written, value, rtol=tolerance, atol=0)
    assert json.loads(sidecar_path(out).read_text())["gguf"]["tensors_replaced"] == {name: kind}
    with pytest.raises(errors.GgufError, match="shape"):
        prune_gguf(source, tmp_path / "bad.gguf", KEPT, RECORD, replacements={name: value.T})
    with pytest.raises(errors.GgufError, match=r"blk\.3\.ffn_down\.weight"):  # block 4 is removed: blk.3 is 5
        prune_gguf(
            source, tmp_path / "bad.gguf", [0, 1, 2], RECORD, replacements={"blk.3.ffn_down.weight": value}
        )
    assert not (tmp_path / "bad.gguf").exists()


def run_cli(cli, argv: list[str]) -> tuple[int, str]:
    """``avss ARGV`` through the shared ``cli`` fixture: exit code and everything it printed."""
    result = cli(*argv)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    "extra", [["--n-layers", "2"], ["--n-layers", "2", "--iterative", "--method", "angular"]]
)
def test_cli_prunes_a_gguf_into_a_gguf_and_evaluates_it(
    source: Path,
    tmp_path: Path,
    extra: list[str],
    cli,
) -> None:
    if "gemma3" in source.name and "--iterative" in extra:
        pytest.skip("one iterative run (llama) is enough")
    out = tmp_path / "pruned.gguf"
    code, text = run_cli(cli, ["prune", str(source), *FAST, "--out", str(out), *extra])
    assert code == 0, text
    record = json.loads(sidecar_path(out).read_text())
    assert_stamped(record, PRUNING_FORMAT)
    assert record["source_model"]["kind"] == "gguf" and record["gguf"]["tensors_copied"]
    assert len(record["removed_layers"]) == 2
    assert record["selection"]["iterative"] == ("--iterative" in extra)
    reference, _ = hf_pruned_logits(source, record["removed_layers"])
    with torch.no_grad():
        torch.testing.assert_close(reload(out)(**random_batch()).logits, reference, rtol=0, atol=0)
    # avss eval on the pruned file: loaded like any GGUF (dequantized once, per-layer fields applied)
    results = tmp_path / "results.json"
    argv = [
        "eval",
        str(out),
        "--tasks",
        "perplexity",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--out",
        str(results),
    ]
    code, text = run_cli(cli, argv)
    assert code == 0, text
    assert json.loads(results.read_text())["model"]["kind"] == "gguf"
    loaded = load_model(str(out), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**random_batch()).logits, reference, rtol=0, atol=0)


def test_an_existing_output_is_kept_unless_overwrite(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.gguf"
    out.write_text("previous result")
    with pytest.raises(errors.OutputError, match="--overwrite"):
        prune_gguf(source, out, KEPT, RECORD)
    assert out.read_text() == "previous result"
    prune_gguf(source, out, KEPT, RECORD, overwrite=True)
    assert gguf.GGUFReader(out).tensors


def test_a_failed_write_leaves_no_partial_file(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    written: list[int] = []

    def disk_full(self: gguf.GGUFWriter, *args: object, **kwargs: object) -> None:
        written.append(1)
        if len(written) > 3:  # a few tensors are on disk, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(errors.OutputError, match="No space left on device"):
        prune_gguf(source, tmp_path / "pruned.gguf", KEPT, RECORD)
    assert list(tmp_path.iterdir()) == []


def test_a_linear_patch_goes_into_the_gguf_as_f32(source: Path, tmp_path: Path, cli) -> None:
    """``--patch linear`` with a .gguf --out: the folded down projections are written as F32, every other
    tensor is copied, and the file reloads with the logits of the same patch saved as a model directory."""
    if "gemma3" in source.name:
        pytest.skip("the patch refuses post-MLP-norm architectures such as Gemma 3")
    calibration = ["--samples", "16", "--max-length", "32", "--batch-size", "8", "--device", "cpu"]
    patch = ["--n-layers", "2", "--method", "block_influence", "--patch", "linear"]  # FAST is too few tokens
    common = ["prune", str(source), *calibration, *patch]
    out, directory = tmp_path / "patched.gguf", tmp_path / "patched-dir"
    for target in (out, directory):
        code, text = run_cli(cli, [*common, "--out", str(target)])
        assert code == 0, text
    record = json.loads(sidecar_path(out).read_text())
    assert record["patch"]["runs"] and 0 not in record["removed_layers"]
    reader = gguf.GGUFReader(out)
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    kept = record["kept_layers"]
    folded = {f"blk.{kept.index(run['folded_into'])}.ffn_down.weight" for run in record["patch"]["runs"]}
    assert all(types[name] == gguf.GGMLQuantizationType.F32 for name in folded)
    assert any(
        types[name] != gguf.GGMLQuantizationType.F32 for name in types if name.endswith("ffn_up.weight")
    )
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reload(out)(**random_batch()).logits, reference(**random_batch()).logits)
