"""The bad-input catalogue: every way a user can hand avss something wrong, one table row per case.

Each CLI row runs ``avss`` exactly as :func:`avss.cli.main` does (in process, so monkeypatched failures reach
it) and asserts exit code 2, a message naming the problem, no traceback, and that the workspace, including
the ``--out`` location, is byte-for-byte unchanged (no partial or temporary files left behind). API rows
assert the specific :class:`avss.errors.AvssError` subclass. A few rows run ``python -m avss`` in a
subprocess to check the installed entry point end to end.
``docs/troubleshooting.md`` is generated from these tables by ``scripts/gen_troubleshooting.py``.

Tests run as root, where permission bits are ignored, so "unwritable" is simulated two ways: an ``--out``
below a regular file (no process can create it) and ``os.access`` monkeypatched to deny writing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from _tiny import VOCAB, random_batch, tiny_model, tiny_tokenizer
from _tiny_gguf import tiny_gguf, truncated_copy
from avss import errors
from avss.cli import main

FAST = ["--samples", "2", "--max-length", "16", "--batch-size", "2", "--device", "cpu"]
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_dir(saved_tiny_model) -> Path:
    return saved_tiny_model(NUM_LAYERS)


@dataclass
class Workspace:
    """A case's files: everything under ``root`` must be unchanged after the failing command."""

    root: Path
    template: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def model(self) -> str:
        return str(self.template)

    def file(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    def variant(self, edit: Callable[[Path], None]) -> str:
        """A copy of the tiny model changed by ``edit`` (config, weights, ...)."""
        path = self.root / "model"
        shutil.copytree(self.template, path)
        edit(path)
        return str(path)

    def previous_result(self) -> None:
        """A complete earlier output at ``--out`` that a failed run must keep."""
        (self.out / "pruned").mkdir(parents=True)
        (self.out / "pruned" / "config.json").write_text('{"previous": true}\n')
        (self.out / "scores.json").write_text('{"previous": true}\n')
        (self.out / "results.json").write_text('{"previous": true}\n')


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_file()
        else "dir"
        for path in sorted(root.rglob("*"))
    }


def edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))

    return edit


def pickle_weights(path: Path) -> None:
    """Replace model.safetensors by a pickle checkpoint with the same tensors."""
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")


def unsupported_architecture(path: Path) -> None:
    """A genuine transformers architecture (Falcon) that has no row in the adapter table."""
    config = AutoConfig.for_model(
        "falcon", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=NUM_LAYERS
    )
    shutil.rmtree(path)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def pruned_model(ws: Workspace) -> None:
    """A folder written by the pruning saver (block 1 of 4 removed), what `avss heal` starts from."""
    from avss.pruning.prune import PruningRecord, save_pruned

    record = PruningRecord({"name": "tiny"}, [1], [0, 2, 3], 4, "avss", {})
    save_pruned(tiny_model("llama", 3), tiny_tokenizer(), ws.root / "pruned-model", record)


def truncate_weights(path: Path) -> None:
    """Cut model.safetensors to half its length, as an interrupted copy would."""
    weights = path / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)


def corrupt_weights(path: Path) -> None:
    """Overwrite the safetensors header length with garbage, as a damaged disk would."""
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8
    weights.write_bytes(bytes(data))


def save_tiny(path: Path, model_type: str) -> None:
    """A tiny model of another supported family, saved with the tokenizer at ``path``."""
    tiny_model(model_type, NUM_LAYERS).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def poison(value: float, layer: int = 2) -> Callable[[Path], None]:
    """Set one block's MLP output weights to NaN or Inf, so that block's activations are non-finite."""

    def edit(path: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            model.model.layers[layer].mlp.down_proj.weight.fill_(value)
        model.save_pretrained(path)

    return edit


def refuse_to_load(*args: object, **kwargs: object) -> None:
    """Stands in for ``load_model`` where options must be rejected before any model is loaded."""
    raise AssertionError("the model was loaded before the options were checked")


def loading_refused_in(module: str) -> Callable[[pytest.MonkeyPatch], None]:
    """A case patch: ``module``'s ``load_model`` is :func:`refuse_to_load`."""
    return lambda mp: mp.setattr(f"{module}.load_model", refuse_to_load)


def deny_writing(path: object, mode: int, **kwargs: object) -> bool:
    """``os.access`` as seen by a user without write permission (root ignores permission bits)."""
    return not mode & os.W_OK


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_mid_save(self: PreTrainedModel, directory: str | Path, *args: object, **kwargs: object) -> None:
    """Write part of a checkpoint, then fail the way a full disk does."""
    (Path(directory) / "model.safetensors").write_bytes(b"\0" * 1024)
    disk_full()


def binary_file(ws: Workspace, name: str) -> str:
    """Seeded random bytes (not UTF-8) under a text file's name, as a mistaken ``--data`` would be."""
    path = ws.root / name
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    return str(path)


@dataclass(frozen=True)
class Case:
    """One bad input: the command line it builds, what the message must say, and an optional failure patch."""

    id: str
    argv: Callable[[Workspace], list[str]]
    message: tuple[str, ...]
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    setup: Callable[[Workspace], None] | None = None
    needs: str | None = None


def score(ws: Workspace, *extra: str, model: str | None = None) -> list[str]:
    return ["score", model or ws.model, *FAST, "--out", str(ws.out / "scores.json"), *extra]


def prune(ws: Workspace, *extra: str, model: str | None = None) -> list[str]:
    return ["prune", model or ws.model, *FAST, "--out", str(ws.out / "pruned"), *extra]


def eval_cli(ws: Workspace, *extra: str, model: str | None = None, out: str | None = None) -> list[str]:
    out = out or str(ws.out / "results.json")
    return ["eval", model or ws.model, "--tasks", "sciq", "--device", "cpu", "--out", out, *extra]


def heal(ws: Workspace, *extra: str, out: str | None = None) -> list[str]:
    """``avss heal`` of the pruned model :func:`pruned_model` saves."""
    return ["heal", str(ws.root / "pruned-model"), "--out", out or str(ws.out / "healed"), *extra]


def gguf_file(
    name: str, claimed_arch: str | None = None, truncated: bool = False
) -> Callable[[Workspace], None]:
    """Setup: a tiny llama GGUF at ``WORK/name`` (claiming another architecture, or cut off mid-tensor)."""

    def setup(ws: Workspace) -> None:
        path = tiny_gguf("llama", ws.root / name, NUM_LAYERS, claimed_arch=claimed_arch)
        if truncated:
            truncated_copy(path, path)

    return setup


def previous_gguf(ws: Workspace) -> None:
    gguf_file("model.gguf")(ws)
    ws.out.mkdir()
    (ws.out / "pruned.gguf").write_text("previous result")


def tiny_study(ws: Workspace) -> list[str]:
    return [
        "study",
        ws.model,
        "--methods",
        "last",
        "--fractions",
        "0,0.5",
        "--tasks",
        "perplexity",
        "--samples",
        "2",
        "--max-length",
        "16",
        "--device",
        "cpu",
        "--out",
        str(ws.out / "study"),
    ]


def previous_study(ws: Workspace) -> None:
    """Setup: the finished study of :func:`tiny_study`'s command line in WORK/out/study."""
    from typer.testing import CliRunner

    from avss.cli import app

    result = CliRunner().invoke(app, tiny_study(ws))
    assert result.exit_code == 0, result.output


def prune_to_gguf(ws: Workspace, model: str, *extra: str) -> list[str]:
    return ["prune", model, *FAST, "--out", str(ws.out / "pruned.gguf"), *extra]


CLI_CASES = [
    # --- the model ---
    Case("missing model path", lambda ws: score(ws, model=str(ws.root / "no-such-model")), ("not found",)),
    Case(
        "model path is a file",
        lambda ws: score(ws, model=ws.file("weights.txt", "x")),
        ("is a file", "model directory or a .gguf file"),
    ),
    Case(
        "unreadable config.json",
        lambda ws: score(ws, model=ws.variant(lambda p: (p / "config.json").write_text("{not json"))),
        ("config.json", "not a valid JSON file"),
    ),
    Case(
        "config.json field its model type rejects",
        lambda ws: score(ws, model=ws.variant(edit_config(model_type="falcon"))),
        ("cannot read the config", "invalid field"),
    ),
    Case(
        "directory that is not a model",
        lambda ws: score(ws, model=str(ws.root / "empty-dir")),
        ("is not a model directory", "no config.json"),
        setup=lambda ws: (ws.root / "empty-dir").mkdir(),
    ),
    Case(
        "model directory without weights",
        lambda ws: score(
            ws, "--allow-pickle", model=ws.variant(lambda p: (p / "model.safetensors").unlink())
        ),
        ("has no weights",),
    ),
    Case(
        "unsupported architecture",
        lambda ws: score(ws, model=ws.variant(unsupported_architecture)),
        ("architecture 'falcon' is not supported", "llama"),
    ),
    Case(
        "architecture unknown to transformers",
        lambda ws: score(ws, model=ws.variant(edit_config(model_type="not_a_real_arch"))),
        ("not_a_real_arch", "does not recognize this architecture"),
    ),
    Case(
        "unknown embedded name",
        lambda ws: score(ws, model="smollm9-1t"),
        ("'smollm9-1t' not found", "smollm2-135m"),
    ),
    Case(
        "missing .gguf file",
        lambda ws: score(ws, model=str(ws.root / "model.gguf")),
        ("GGUF file", "does not exist"),
    ),
    Case(
        "custom code without --trust-remote-code",
        lambda ws: score(
            ws, model=ws.variant(edit_config(auto_map={"AutoModelForCausalLM": "modeling_x.XModel"}))
        ),
        ("declares custom model code", "--trust-remote-code"),
    ),
    Case(
        "pickle-only weights without --allow-pickle",
        lambda ws: score(ws, model=ws.variant(pickle_weights)),
        ("only pickle weights", "pytorch_model.bin", "--allow-pickle"),
    ),
    # --- the data ---
    Case(
        "missing data file",
        lambda ws: score(ws, "--data", str(ws.root / "none.txt")),
        ("does not exist",),
        patch=loading_refused_in("avss.cli.core"),
    ),
    Case(
        "empty data file", lambda ws: score(ws, "--data", ws.file("empty.txt", "")), ("empty.txt is empty",)
    ),
    Case(
        "whitespace-only data file",
        lambda ws: score(ws, "--data", ws.file("blank.txt", "\n\n  \n")),
        ("blank.txt is empty",),
    ),
    Case(
        "binary data file",
        lambda ws: score(ws, "--data", binary_file(ws, "random.txt")),
        ("random.txt is not UTF-8 text", "invalid byte at offset"),
    ),
    Case(
        "binary JSONL file",
        lambda ws: score(ws, "--data", binary_file(ws, "random.jsonl")),
        ("random.jsonl is not UTF-8 text",),
    ),
    Case(
        "empty JSONL file",
        lambda ws: score(ws, "--data", ws.file("empty.jsonl", "\n")),
        ("empty.jsonl is empty",),
    ),
    Case(
        "malformed JSONL line",
        lambda ws: score(
            ws, "--data", ws.file("bad.jsonl", '{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
        ),
        ("bad.jsonl:3", "malformed JSON"),
    ),
    Case(
        "JSONL line that is not an object",
        lambda ws: score(ws, "--data", ws.file("list.jsonl", '{"text": "fine"}\n["a", "b"]\n')),
        ("list.jsonl:2", "expected a JSON object"),
    ),
    Case(
        "JSONL without a text field",
        lambda ws: score(ws, "--data", ws.file("notext.jsonl", '{"body": "wrong schema"}\n')),
        ("row 1 has no string field 'text'",),
    ),
    Case(
        "texts shorter than 2 tokens",
        lambda ws: score(ws, "--data", ws.file("short.txt", "a")),
        ("1 token(s)", "at least 2"),
    ),
    Case(
        "--data-dir that does not exist",
        lambda ws: score(ws, "--data-dir", str(ws.root / "nodata")),
        ("not a directory",),
    ),
    Case(
        "--data-dir without WikiText-2",
        lambda ws: score(ws, "--data-dir", str(ws.root / "data")),
        ("WikiText-2 valid not found",),
        setup=lambda ws: (ws.root / "data").mkdir(),
    ),
    Case(
        "hub dataset without the datasets package",
        lambda ws: score(ws, "--dataset", "wikitext:wikitext-2-raw-v1"),
        ("pip install 'avss-llm[datasets]'",),
        needs="no-datasets",
    ),
    # --- evaluation data ---
    Case(
        "task file missing and hub offline",
        lambda ws: eval_cli(ws, "--data-dir", str(ws.root / "data")),
        (
            "data/sciq/sciq_test.jsonl does not exist",
            "allenai/sciq@test was not read",
            "HF_HUB_OFFLINE=1 is set",
        ),
        patch=lambda mp: (mp.delenv("HF_DATASETS_OFFLINE", raising=False), mp.setenv("HF_HUB_OFFLINE", "1")),
        setup=lambda ws: (ws.root / "data").mkdir(),
    ),
    Case(
        "task file missing with --data-source local",
        lambda ws: eval_cli(ws, "--data-dir", str(ws.root / "data"), "--data-source", "local"),
        ("does not exist", "was not tried (--data-source local)", "--data-source auto"),
        setup=lambda ws: (ws.root / "data").mkdir(),
    ),
    Case(
        "unknown --data-source",
        lambda ws: eval_cli(ws, "--data-source", "web"),
        ("--data-source must be one of auto, local, hub, not 'web'",),
    ),
    # --- scoring options ---
    Case(
        "invalid --threshold value",
        lambda ws: score(ws, "--threshold", "abs:-1"),
        ("invalid threshold 'abs:-1'",),
    ),
    Case(
        "invalid --threshold kind",
        lambda ws: score(ws, "--threshold", "0.01"),
        ("invalid threshold '0.01'", "abs:EPS"),
    ),
    Case(
        "invalid --site", lambda ws: score(ws, "--site", "residual"), ("invalid --site 'residual'", "block")
    ),
    Case(
        "invalid --variance",
        lambda ws: score(ws, "--variance", "sample"),
        ("invalid --variance 'sample'", "pooled"),
    ),
    Case("--samples 0", lambda ws: score(ws, "--samples", "0"), ("Invalid value for '--samples'",)),
    Case("--max-length 1", lambda ws: score(ws, "--max-length", "1"), ("Invalid value for '--max-length'",)),
    Case("unknown option", lambda ws: score(ws, "--frobnicate"), ("No such option", "--frobnicate")),
    # --- pruning options ---
    Case(
        "--fraction 0",
        lambda ws: prune(ws, "--fraction", "0"),
        ("--fraction must be strictly between 0 and 1",),
    ),
    Case(
        "--fraction 1",
        lambda ws: prune(ws, "--fraction", "1"),
        ("--fraction must be strictly between 0 and 1",),
    ),
    Case("--fraction negative", lambda ws: prune(ws, "--fraction", "-0.5"), ("strictly between 0 and 1",)),
    Case(
        "--fraction rounds to 0 layers", lambda ws: prune(ws, "--fraction", "0.05"), ("rounds to 0 layers",)
    ),
    Case(
        "--n-layers = number of layers",
        lambda ws: prune(ws, "--n-layers", "4"),
        ("--n-layers must be between 1 and 3",),
    ),
    Case(
        "--n-layers > number of layers",
        lambda ws: prune(ws, "--n-layers", "9"),
        ("--n-layers must be between 1 and 3",),
    ),
    Case("--n-layers 0", lambda ws: prune(ws, "--n-layers", "0"), ("--n-layers must be at least 1",)),
    Case(
        "mass removes every layer",
        lambda ws: prune(ws, "--rule", "mass", "--tau", "1"),
        ("would remove every layer",),
    ),
    Case(
        "mass removes nothing",
        lambda ws: prune(ws, "--rule", "mass", "--tau", "0.001"),
        ("nothing to remove",),
    ),
    Case(
        "--tau out of range",
        lambda ws: prune(ws, "--rule", "mass", "--tau", "1.5"),
        ("--tau must be in (0, 1]",),
    ),
    Case("unknown --rule", lambda ws: prune(ws, "--rule", "random"), ("unknown --rule 'random'",)),
    Case("--protect out of range", lambda ws: prune(ws, "--protect", "7"), ("cannot protect '7'",)),
    Case(
        "--protect leaves too few layers",
        lambda ws: prune(ws, "--protect", "0,1,2", "--n-layers", "2"),
        ("cannot remove 2 of 4 layers (3 protected)",),
    ),
    Case("--layers out of range", lambda ws: prune(ws, "--layers", "1,4"), ("block 4 out of range", "0-3")),
    Case("--layers duplicate", lambda ws: prune(ws, "--layers", "1,2,1"), ("lists block 1 twice",)),
    Case("--layers every block", lambda ws: prune(ws, "--layers", "0,1,2,3"), ("all 4 blocks",)),
    Case("--layers not integers", lambda ws: prune(ws, "--layers", "1,two"), ("block indices", "'two'")),
    Case(
        "--layers with --fraction",
        lambda ws: prune(ws, "--layers", "1", "--fraction", "0.5"),
        ("drop --fraction",),
    ),
    Case("unknown --sublayer", lambda ws: prune(ws, "--sublayer", "heads"), ("unknown --sublayer 'heads'",)),
    Case(
        "--sublayer with --patch",
        lambda ws: prune(ws, "--sublayer", "attn", "--patch", "linear"),
        ("--sublayer cannot be combined with --patch",),
    ),
    Case(
        "--sublayer with --heal",
        lambda ws: prune(ws, "--sublayer", "attn", "--heal", "lora"),
        ("drop --heal",),
    ),
    Case(
        "--sublayer on parallel attention and MLP",
        lambda ws: prune(ws, "--sublayer", "attn", model=str(ws.root / "neox")),
        ("gpt_neox has no residual stream between its attention and MLP sublayers", "supported: gemma"),
        setup=lambda ws: save_tiny(ws.root / "neox", "gpt_neox"),
    ),
    # --- activations ---
    Case(
        "NaN activations",
        lambda ws: score(ws, model=ws.variant(poison(float("nan")))),
        ("layer 2 (model.layers.2)", "NaN/Inf"),
    ),
    Case(
        "Inf activations",
        lambda ws: prune(ws, model=ws.variant(poison(float("inf")))),
        ("layer 2 (model.layers.2)", "NaN/Inf"),
    ),
    # --- GGUF in, GGUF out ---
    Case(
        "truncated .gguf file",
        lambda ws: score(ws, model=str(ws.root / "cut.gguf")),
        ("GGUF file", "cut.gguf is truncated or corrupt"),
        setup=gguf_file("cut.gguf", truncated=True),
    ),
    Case(
        "GGUF output from a truncated .gguf file",
        lambda ws: prune_to_gguf(ws, str(ws.root / "cut.gguf")),
        ("cut.gguf is truncated or corrupt",),
        setup=gguf_file("cut.gguf", truncated=True),
    ),
    Case(
        "GGUF output from an architecture avss cannot prune",
        lambda ws: prune_to_gguf(ws, str(ws.root / "falcon.gguf")),
        ("GGUF architecture 'falcon' is not supported for GGUF output", "llama"),
        setup=gguf_file("falcon.gguf", claimed_arch="falcon"),
    ),
    Case(
        "GGUF --out exists without --overwrite",
        lambda ws: prune_to_gguf(ws, str(ws.root / "model.gguf")),
        ("pruned.gguf exists", "--overwrite"),
        setup=previous_gguf,
    ),
    Case(
        "GGUF --out from a model directory",
        lambda ws: prune_to_gguf(ws, ws.model),
        ("is a GGUF file, which needs a GGUF model",),
    ),
    Case(
        "GGUF --out with --heal",
        lambda ws: prune_to_gguf(ws, str(ws.root / "model.gguf"), "--heal", "lora"),
        ("--heal retrains the kept blocks",),
        setup=gguf_file("model.gguf"),
    ),
    # --- hallucination and mitigation options ---
    Case(
        "truncated safetensors (score)",
        lambda ws: score(ws, model=ws.variant(truncate_weights)),
        ("truncated or corrupt", "incomplete metadata"),
    ),
    Case(
        "corrupted safetensors (eval)",
        lambda ws: eval_cli(ws, model=ws.variant(corrupt_weights)),
        ("truncated or corrupt", "header"),
    ),
    Case(
        "truncated safetensors (hallucination)",
        lambda ws: ["hallucination", ws.variant(truncate_weights), "--out", str(ws.out / "eavss")],
        ("truncated or corrupt",),
    ),
    Case(
        "hallucination --out is a file",
        lambda ws: ["hallucination", ws.model, "--out", ws.file("eavss.txt", "keep me")],
        ("exists and is a file",),
    ),
    Case(
        "hallucination --out on a special filesystem",
        lambda ws: ["hallucination", ws.model, "--out", "/proc/avss-eavss"],
        ("cannot write in /proc",),
    ),
    Case(
        "mitigate --out is a file",
        lambda ws: ["mitigate", ws.model, "--out", ws.file("mitigated.txt", "keep me")],
        ("exists and is a file",),
    ),
    Case(
        "mitigate --out on a special filesystem",
        lambda ws: ["mitigate", ws.model, "--out", "/proc/avss-mitigated"],
        ("cannot write in /proc",),
    ),
    Case(
        "heal --out is a file",
        lambda ws: heal(ws, out=ws.file("healed.txt", "keep me")),
        ("exists and is a file",),
        setup=pruned_model,
    ),
    Case(
        "heal --out on a special filesystem",
        lambda ws: heal(ws, out="/proc/avss-healed"),
        ("cannot write in /proc",),
        setup=pruned_model,
    ),
    Case(
        "heal --threads invalid",
        lambda ws: heal(ws, "--threads", "-1"),
        ("--threads must be 'auto'",),
        setup=pruned_model,
    ),
    Case(
        "heal --data binary file",
        lambda ws: [
            "heal",
            str(ws.root / "pruned-model"),
            "--data",
            binary_file(ws, "train.txt"),
            "--out",
            str(ws.out / "healed"),
            "--device",
            "cpu",
        ],
        ("train.txt",),
        setup=pruned_model,
    ),
    Case(
        "eval --out is a directory",
        lambda ws: eval_cli(ws, out=str(ws.root)),
        ("is a directory; choose a file path",),
    ),
    Case(
        "eval --out on a special filesystem",
        lambda ws: eval_cli(ws, out="/proc/avss-results.json"),
        ("cannot write in /proc",),
    ),
    Case(
        "report --out is a directory",
        lambda ws: ["report", str(ws.root), "--out", str(ws.root)],
        ("is a directory; choose a file path",),
    ),
    Case(
        "report --out on a special filesystem",
        lambda ws: ["report", str(ws.root), "--out", "/proc/avss-report.html"],
        ("cannot write in /proc",),
    ),
    Case(
        "unknown --combine (hallucination)",
        lambda ws: ["hallucination", ws.model, "--combine", "product", "--out", str(ws.out / "eavss")],
        ("invalid --combine 'product'", "ratio, diff"),
        patch=loading_refused_in("avss.cli.hallucination_cmd"),
    ),
    Case(
        "unknown --combine (mitigate)",
        lambda ws: ["mitigate", ws.model, "--combine", "product", "--out", str(ws.out / "mitigated")],
        ("invalid --combine 'product'",),
        patch=loading_refused_in("avss.cli.hallucination_cmd"),
    ),
    Case(
        "mitigate --layers that is neither a strategy nor indices",
        lambda ws: ["mitigate", ws.model, "--layers", "best", "--out", str(ws.out / "mitigated")],
        ("--layers 'best'", "comma-separated indices"),
        patch=loading_refused_in("avss.cli.hallucination_cmd"),
    ),
    Case(
        "mitigate --autocast unknown",
        lambda ws: ["mitigate", ws.model, "--autocast", "fp8", "--out", str(ws.out / "mitigated")],
        ("autocast must be one of auto, bf16, off", "'fp8'"),
        patch=loading_refused_in("avss.cli.hallucination_cmd"),
    ),
    Case(
        "heal --autocast unknown",
        lambda ws: heal(ws, "--autocast", "fp8"),
        ("autocast must be one of auto, bf16, off",),
        setup=pruned_model,
    ),
    Case(
        "mitigate --eval-tasks with an unknown task",
        lambda ws: [
            "mitigate",
            ws.model,
            "--eval",
            "--eval-tasks",
            "sciq,nosuch",
            "--out",
            str(ws.out / "m"),
        ],
        ("unknown task 'nosuch'",),
        patch=loading_refused_in("avss.cli.hallucination_cmd"),
    ),
    # --- study, report and heal ---
    Case(
        "unknown study method",
        lambda ws: ["study", ws.model, "--methods", "avss,nosuch", "--out", str(ws.out / "study")],
        ("nosuch",),
    ),
    Case(
        "study fraction out of range",
        lambda ws: ["study", ws.model, "--fractions", "0,1.5", "--out", str(ws.out / "study")],
        ("fractions must be in [0, 1)",),
    ),
    Case(
        "study --out on a special filesystem",
        lambda ws: ["study", ws.model, "--methods", "random", "--out", "/proc/avss-study"],
        ("cannot write in /proc",),
    ),
    Case(
        "study --out is a file",
        lambda ws: ["study", ws.model, "--methods", "random", "--out", ws.file("study.txt", "keep me")],
        ("exists and is a file",),
    ),
    Case(
        "study folder rerun without --resume",
        tiny_study,
        ("holds this study already", "continue it with --resume"),
        setup=previous_study,
    ),
    Case(
        "study --report-only of a folder with no study",
        lambda ws: ["study", ws.model, "--methods", "last", "--report-only", "--out", str(ws.out / "s")],
        ("holds no study to report",),
        patch=loading_refused_in("avss.study.runner"),
    ),
    Case(
        "study --dtype unknown",
        lambda ws: ["study", ws.model, "--methods", "last", "--dtype", "float8", "--out", str(ws.out / "s")],
        ("invalid dtype 'float8'",),
        patch=loading_refused_in("avss.study.runner"),
    ),
    Case(
        "study --threads invalid",
        lambda ws: ["study", ws.model, "--methods", "last", "--threads", "many", "--out", str(ws.out / "s")],
        ("--threads must be 'auto'",),
        patch=loading_refused_in("avss.study.runner"),
    ),
    Case(
        "demo fraction out of range",
        lambda ws: ["demo", ws.model, "--fraction", "1.5", "--out", str(ws.out / "demo")],
        ("strictly between 0 and 1",),
        patch=loading_refused_in("avss.demo"),
    ),
    Case(
        "demo --dtype unknown",
        lambda ws: ["demo", ws.model, "--dtype", "float8", "--out", str(ws.out / "demo")],
        ("invalid --dtype 'float8'",),
        patch=loading_refused_in("avss.demo"),
    ),
    Case(
        "demo --out is a file",
        lambda ws: ["demo", ws.model, "--out", ws.file("demo.txt", "keep me")],
        ("demo.txt",),
        patch=loading_refused_in("avss.demo"),
    ),
    Case(
        "demo --out on a special filesystem",
        lambda ws: ["demo", ws.model, "--out", "/proc/avss-demo"],
        ("/proc",),
        patch=loading_refused_in("avss.demo"),
    ),
    Case("models with an unknown option", lambda ws: ["models", "--frobnicate"], ("No such option",)),
    Case(
        "report of a missing run directory",
        lambda ws: ["report", str(ws.root / "no-run"), "--out", str(ws.out / "report.html")],
        ("does not exist",),
    ),
    Case(
        "heal a model that was not pruned",
        lambda ws: ["heal", ws.model, "--out", str(ws.out / "healed")],
        ("has no avss_pruning.json",),
    ),
    # --- the output ---
    Case(
        "--out not empty without --overwrite",
        lambda ws: prune(ws),
        ("exists and is not empty", "--overwrite"),
        setup=Workspace.previous_result,
    ),
    Case(
        "--out is a file",
        lambda ws: ["prune", ws.model, *FAST, "--out", ws.file("out.txt", "keep me")],
        ("exists and is a file",),
    ),
    Case(
        "--out below a regular file (prune)",
        lambda ws: ["prune", ws.model, *FAST, "--out", str(Path(ws.file("blocker", "x")) / "pruned")],
        ("cannot create output directory",),
    ),
    Case(
        "--out below a regular file (score)",
        lambda ws: ["score", ws.model, *FAST, "--out", str(Path(ws.file("blocker", "x")) / "s.json")],
        ("cannot create output directory",),
    ),
    Case(
        "--out on a special filesystem (prune)",
        lambda ws: ["prune", ws.model, *FAST, "--out", "/proc/avss-out"],
        ("cannot write in /proc", "choose another --out"),
    ),
    Case(
        "--out on a special filesystem (score)",
        lambda ws: ["score", ws.model, *FAST, "--out", "/proc/avss-scores.json"],
        ("cannot write in /proc", "choose another --out"),
    ),
    Case(
        "--out file exists without --overwrite (score)",
        lambda ws: score(ws),
        ("exists; pass --overwrite",),
        setup=Workspace.previous_result,
    ),
    Case(
        "--out file exists without --overwrite (eval)",
        lambda ws: eval_cli(ws),
        ("exists; pass --overwrite",),
        setup=Workspace.previous_result,
    ),
    Case(
        "--out file exists without --overwrite (report)",
        lambda ws: ["report", str(ws.out), "--out", str(ws.out / "scores.json")],
        ("exists; pass --overwrite",),
        setup=Workspace.previous_result,
    ),
    Case(
        "--out is a directory where a file is expected (score)",
        lambda ws: ["score", ws.model, *FAST, "--out", str(ws.out / "pruned")],
        ("is a directory; choose a file path",),
        setup=Workspace.previous_result,
    ),
    Case(
        "--out not writable",
        lambda ws: score(ws, "--overwrite"),
        ("is not writable",),
        patch=lambda mp: mp.setattr(os, "access", deny_writing),
        setup=Workspace.previous_result,
    ),
    Case(
        "disk full writing scores JSON",
        lambda ws: score(ws, "--overwrite"),
        ("failed to write", "No space left on device"),
        patch=lambda mp: mp.setattr(Path, "write_text", disk_full),
        setup=Workspace.previous_result,
    ),
    Case(
        "disk full mid-save of a pruned model",
        lambda ws: prune(ws, "--overwrite"),
        ("failed to write", "No space left on device"),
        patch=lambda mp: mp.setattr(PreTrainedModel, "save_pretrained", disk_full_mid_save),
        setup=Workspace.previous_result,
    ),
    # --- the device ---
    Case("invalid --device", lambda ws: [*score(ws), "--device", "banana"], ("invalid --device 'banana'",)),
    Case("invalid --dtype", lambda ws: [*score(ws), "--dtype", "float8"], ("invalid --dtype 'float8'",)),
    Case("invalid --threads", lambda ws: [*score(ws), "--threads", "0"], ("--threads must be 'auto'",)),
    Case(
        "CUDA requested with no GPU",
        lambda ws: [*score(ws), "--device", "cuda"],
        ("no CUDA GPU is available", "--device cpu"),
        needs="no-cuda",
    ),
    Case(
        "CUDA index requested with no GPU",
        lambda ws: [*prune(ws), "--device", "cuda:1"],
        ("no CUDA GPU is available",),
        needs="no-cuda",
    ),
]

NEEDS = {
    "no-cuda": (torch.cuda.is_available(), "a CUDA GPU is available"),
    "no-datasets": (bool(__import__("importlib").util.find_spec("datasets")), "`datasets` is installed"),
}


def run_cli(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Run ``avss ARGV`` as the console script does; return the exit code and whitespace-collapsed stderr."""
    monkeypatch.setattr(sys, "argv", ["avss", *argv])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, " ".join(capsys.readouterr().err.split())


def prepare(case: Case, root: Path, template: Path) -> Workspace:
    if case.needs is not None and NEEDS[case.needs][0]:
        pytest.skip(NEEDS[case.needs][1])
    ws = Workspace(root, template)
    if case.setup is not None:
        case.setup(ws)
    return ws


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_cli_rejects_bad_input(
    case: Case,
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ws = prepare(case, tmp_path, tiny_dir)
    argv = case.argv(ws)
    before = snapshot(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch)
    code, err = run_cli(argv, monkeypatch, capsys)
    monkeypatch.undo()
    assert code == 2, err
    for fragment in case.message:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before, "the failed command changed the workspace"


@dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable[[Workspace], object]
    error: type[errors.AvssError]
    message: tuple[str, ...]


def _evaluate_sciq_without_choices(ws: Workspace) -> object:
    from avss.evaluation import evaluate

    (ws.root / "sciq").mkdir()
    (ws.root / "sciq" / "sciq_test.jsonl").write_text(
        '{"question": "Why?", "label": 0, "support": "Because."}\n'
    )
    return evaluate(tiny_model("llama", 2), tiny_tokenizer(), ["sciq"], data_dir=ws.root, limit=1)


def _evaluate_unknown_task(ws: Workspace) -> object:
    from avss.evaluation import evaluate

    return evaluate(tiny_model("llama", 2), tiny_tokenizer(), ["mmlu_pro_max"], data_dir=ws.root)


def _collect_poisoned(ws: Workspace) -> object:
    from avss.stats.collect import collect_statistics

    model = tiny_model("gpt2", 3)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.fill_(float("nan"))
    return collect_statistics(model, [random_batch()], progress=False)


def _atomic_json_disk_full(ws: Workspace) -> object:
    from avss.io import atomic_write_json

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_text", disk_full)
        return atomic_write_json(ws.out / "scores.json", {"new": True})


def _save_pruned_over_result(ws: Workspace) -> object:
    from avss.pruning.prune import PruningRecord, save_pruned

    record = PruningRecord({}, [1], [0, 2, 3], 4, "avss", {})
    return save_pruned(tiny_model("llama", 3), None, ws.out / "pruned", record)


def _tokenize_short(ws: Workspace) -> object:
    from avss.data import tokenize_texts

    return tokenize_texts(tiny_tokenizer(), ["a"])


def _read_malformed(ws: Workspace) -> object:
    from avss.data import read_jsonl

    return read_jsonl(ws.file("rows.jsonl", '{"a": 1}\n\n{"a": 2,}\n'))


def _prune_spec(**kwargs: object) -> Callable[[Workspace], object]:
    from avss.pruning.rules import PruneSpec

    return lambda ws: PruneSpec(**kwargs).select(torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64))  # type: ignore[arg-type]


def _remove_all(ws: Workspace) -> object:
    from avss.adapters import remove_layers

    return remove_layers(tiny_model("llama", 2), [0, 1])


def _load(spec_of: Callable[[Workspace], str], **kwargs: object) -> Callable[[Workspace], object]:
    from avss.models import load_model

    options = {"device": "cpu", **kwargs}
    return lambda ws: load_model(spec_of(ws), **options)  # type: ignore[arg-type]


def _score_options(**kwargs: str) -> Callable[[Workspace], object]:
    from avss.scorers.run import ScoreOptions

    return lambda ws: ScoreOptions(**kwargs)


def _calibration(**options: object) -> Callable[[Workspace], object]:
    from avss.data import CalibrationOptions

    return lambda ws: CalibrationOptions(**options)  # type: ignore[arg-type]


def _training(**options: object) -> Callable[[Workspace], object]:
    from avss.training import TrainConfig

    return lambda ws: TrainConfig(**options)  # type: ignore[arg-type]


API_CASES = [
    ApiCase(
        "calibration samples 0", _calibration(samples=0), errors.OptionError, ("samples must be at least 1",)
    ),
    ApiCase(
        "calibration max_length 1", _calibration(max_length=1), errors.OptionError, ("at least 2 tokens",)
    ),
    ApiCase(
        "calibration batch_size 0", _calibration(batch_size=0), errors.OptionError, ("batch_size must be",)
    ),
    ApiCase(
        "calibration part without samples", _calibration(samples=None, part=1), errors.OptionError, ("part",)
    ),
    ApiCase("training epochs 0", _training(epochs=0), errors.OptionError, ("epochs and grad_accum",)),
    ApiCase("training lr 0", _training(lr=0.0), errors.OptionError, ("lr must be > 0",)),
    ApiCase("training patience 0", _training(patience=0), errors.OptionError, ("patience must be",)),
    ApiCase("training autocast fp16", _training(autocast="fp16"), errors.OptionError, ("autocast must be",)),
    ApiCase(
        "read_jsonl malformed line", _read_malformed, errors.DataError, ("rows.jsonl:3", "malformed JSON")
    ),
    ApiCase("tokenize_texts too short", _tokenize_short, errors.DataError, ("at least 2",)),
    ApiCase(
        "sciq rows without choices",
        _evaluate_sciq_without_choices,
        errors.DataError,
        ("row 1", "lacks choices"),
    ),
    ApiCase(
        "unknown evaluation task", _evaluate_unknown_task, errors.DataError, ("unknown task 'mmlu_pro_max'",)
    ),
    ApiCase(
        "PruneSpec fraction 1.5", _prune_spec(fraction=1.5), errors.PruneConfigError, ("strictly between",)
    ),
    ApiCase(
        "PruneSpec mass tau 1", _prune_spec(rule="mass", tau=1.0), errors.PruneConfigError, ("every layer",)
    ),
    ApiCase(
        "remove_layers every layer", _remove_all, errors.PruneConfigError, ("cannot remove every layer",)
    ),
    ApiCase(
        "collect NaN activations",
        _collect_poisoned,
        errors.NonFiniteActivationError,
        ("layer 1 (transformer.h.1)",),
    ),
    ApiCase(
        "atomic_write_json disk full",
        _atomic_json_disk_full,
        errors.OutputError,
        ("No space left on device",),
    ),
    ApiCase(
        "save_pruned over a result",
        _save_pruned_over_result,
        errors.OutputError,
        ("not empty", "--overwrite"),
    ),
    ApiCase(
        "load_model unsupported type",
        _load(lambda ws: ws.variant(unsupported_architecture)),
        errors.UnsupportedArchitectureError,
        ("falcon",),
    ),
    ApiCase(
        "load_model pickle weights",
        _load(lambda ws: ws.variant(pickle_weights)),
        errors.ModelNotFoundError,
        ("--allow-pickle",),
    ),
    ApiCase(
        "load_model cuda without GPU",
        _load(lambda ws: ws.model, device="cuda"),
        errors.DeviceError,
        ("no CUDA GPU",),
    ),
    ApiCase(
        "ScoreOptions bad threshold",
        _score_options(threshold="rel:0"),
        errors.OptionError,
        ("invalid threshold",),
    ),
]


@pytest.mark.parametrize("case", API_CASES, ids=[case.id for case in API_CASES])
def test_api_raises_specific_error(case: ApiCase, tiny_dir: Path, tmp_path: Path) -> None:
    if case.error is errors.DeviceError and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available")
    ws = Workspace(tmp_path, tiny_dir)
    ws.previous_result()
    before = snapshot(ws.out)
    with pytest.raises(case.error) as raised:
        case.call(ws)
    for fragment in case.message:
        assert fragment in str(raised.value)
    assert snapshot(ws.out) == before


SUBPROCESS_CASES = [
    (["score", "/nonexistent/model/dir"], "not found"),
    (
        ["prune", "smollm2-135m", "--fraction", "0", "--out", "{out}"],
        "--fraction must be strictly between 0 and 1",
    ),
    (["score", "{model}", "--data", "{bad}", *FAST], "bad.jsonl:2: malformed JSON"),
]


@pytest.mark.parametrize(
    ("argv", "message"), SUBPROCESS_CASES, ids=["missing-model", "fraction-0", "malformed-jsonl"]
)
def test_entry_point_prints_one_line_without_traceback(
    argv: list[str], message: str, tiny_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    values = {"out": str(tmp_path / "out"), "model": str(tiny_dir), "bad": str(bad)}
    env = {**os.environ, "COLUMNS": "400"}
    result = subprocess.run(
        [sys.executable, "-m", "avss", *(arg.format(**values) for arg in argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- safety defaults ---------------------------------------------------------------------------------------


def test_local_load_makes_no_network_call(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model directory loads with every socket connection and DNS lookup failing loudly."""
    import socket

    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[1:] or args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    from avss.models import load_model

    loaded = load_model(str(tiny_dir), device="cpu")
    assert loaded.source["kind"] == "directory"
    assert attempts == []


def test_loaders_get_safe_arguments_by_default(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No remote code, safetensors only and no hub lookups unless the user opts in."""
    from transformers import AutoConfig, AutoTokenizer

    from avss.models import load_model

    calls: list[tuple[str, dict]] = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(location: object, *args: object, _original=original, _name=cls.__name__, **kwargs: object):
            calls.append((_name, kwargs))
            return _original(location, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(str(tiny_dir), device="cpu")
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs in calls:
        assert kwargs["trust_remote_code"] is False, name
        assert kwargs["local_files_only"] is True, name
    model_kwargs = next(kwargs for name, kwargs in calls if name == "AutoModelForCausalLM")
    assert model_kwargs["use_safetensors"] is True


def test_pickle_weights_load_only_when_allowed(tiny_dir: Path, tmp_path: Path) -> None:
    from avss.models import load_model

    ws = Workspace(tmp_path, tiny_dir)
    path = ws.variant(pickle_weights)
    with pytest.raises(errors.ModelNotFoundError, match="--allow-pickle"):
        load_model(path, device="cpu")
    assert load_model(path, device="cpu", allow_pickle=True).model.config.num_hidden_layers == NUM_LAYERS
