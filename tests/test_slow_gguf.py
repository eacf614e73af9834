"""Slow tier: the embedded GGUF models pruned by 25% through the GGUF path, reloaded and evaluated.

Checks that the pruned file is the Hugging Face path's pruned model (same logits, same perplexity), that the
kept blocks' quantized tensors are the input's bytes, and, where a llama.cpp runtime is available
(``llama_cpp`` importable here, or ``AVSS_LLAMA_CPP_PYTHON`` naming an interpreter that has it), that
llama.cpp's perplexity of the pruned file on a WikiText-2 slice matches transformers' within the difference
the two runtimes already show on the unpruned file (llama.cpp quantizes activations for its dot products).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from avss.data import CalibrationOptions, TextSource, bundled_text
from avss.evaluation import evaluate
from avss.models import load_model
from avss.pruning.gguf import gguf_source, plan_tensors, save_pruned_gguf
from avss.pruning.prune import prune
from avss.pruning.rules import PruneSpec
from avss.scorers import get_scorer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
WINDOW, WINDOWS = 512, 4


def llama_cpp_python() -> str | None:
    if os.environ.get("AVSS_LLAMA_CPP_PYTHON"):
        return os.environ["AVSS_LLAMA_CPP_PYTHON"]
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def slice_ids(tokenizer) -> list[int]:
    text = WIKITEXT.read_text(encoding="utf-8")[:60_000] if WIKITEXT.is_file() else bundled_text("evaluation")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= WINDOW * WINDOWS
    return ids[: WINDOW * WINDOWS]


def hf_log_ppl(model, ids: list[int]) -> float:
    """Mean NLL per scored token over disjoint windows, scored as scripts/llamacpp_nll.py scores them."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), WINDOW):
            window = torch.tensor([ids[start : start + WINDOW]])
            logprobs = torch.log_softmax(model(input_ids=window).logits[0, :-1].double(), dim=-1)
            total -= logprobs.gather(1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    return total / count


def llama_cpp_log_ppl(python: str, path: Path, ids: list[int], tmp: Path) -> float:
    ids_file = tmp / "ids.json"
    ids_file.write_text(json.dumps(ids))
    script = ROOT / "scripts" / "llamacpp_nll.py"
    command = [python, str(script), str(path), str(ids_file), "--window", str(WINDOW)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["nll"] / out["tokens"]


@pytest.mark.parametrize(("name", "num_layers"), [("smollm2-135m", 30), ("gemma3-270m", 18)])
def test_gguf_prune_reload_evaluate(tmp_path: Path, name: str, num_layers: int) -> None:
    loaded = load_model(name, device="cpu")
    source = gguf_source(loaded.source)
    assert source is not None
    ids = slice_ids(loaded.tokenizer)
    base_hf = hf_log_ppl(loaded.model, ids)
    result, _ = prune(
        loaded,
        get_scorer("block_influence"),
        TextSource(),
        CalibrationOptions(samples=8, max_length=128),
        PruneSpec(fraction=0.25),
        progress=False,
    )
    assert len(result.removed) == round(0.25 * num_layers)
    out = save_pruned_gguf(source, tmp_path / "pruned.gguf", result.record)

    before = {t.name: t for t in gguf.GGUFReader(source).tensors}
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    plan = plan_tensors(list(before), result.kept)
    assert sorted(after) == sorted(new for _, new in plan)
    for old, new in plan:
        assert after[new].tensor_type == before[old].tensor_type
        assert after[new].data.tobytes() == before[old].data.tobytes(), new
    metadata = gguf.GGUFReader(out)
    arch = metadata.get_field("general.architecture").contents()
    assert metadata.get_field(f"{arch}.block_count").contents() == len(result.kept)

    reloaded = load_model(str(out), device="cpu")
    assert reloaded.model.config.num_hidden_layers == len(result.kept)
    assert getattr(reloaded.model.config, "layer_types", None) == getattr(
        loaded.model.config, "layer_types", None
    )
    prompt = loaded.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.model(**prompt).logits, loaded.model(**prompt).logits, rtol=0, atol=0
        )
    pruned_hf = hf_log_ppl(reloaded.model, ids)
    assert pruned_hf == hf_log_ppl(loaded.model, ids)
    # the bundled evaluation text (avss eval's default perplexity task), as avss eval pruned.gguf scores it
    bundled = evaluate(reloaded.model, reloaded.tokenizer, ["perplexity"], limit=20).metrics["perplexity"]
    reference = evaluate(loaded.model, loaded.tokenizer, ["perplexity"], limit=20).metrics["perplexity"]
    assert bundled == reference and math.isfinite(bundled["perplexity"])
    report = {"model": name, "removed": result.removed, "wikitext_tokens": len(ids)}
    report["bundled_eval_ppl"] = bundled["perplexity"]
    report.update(hf_base_ppl=math.exp(base_hf), hf_pruned_ppl=math.exp(pruned_hf))

    python = llama_cpp_python()
    if python is None:
        print(json.dumps(report))
        pytest.skip("no llama.cpp runtime (pip install llama-cpp-python, or set AVSS_LLAMA_CPP_PYTHON)")
    base_cpp = llama_cpp_log_ppl(python, source, ids, tmp_path)
    pruned_cpp = llama_cpp_log_ppl(python, out, ids, tmp_path)
    report.update(llamacpp_base_ppl=math.exp(base_cpp), llamacpp_pruned_ppl=math.exp(pruned_cpp))
    print(json.dumps(report))
    runtime_gap = abs(base_cpp - base_hf)  # what the two runtimes differ by on the unpruned file
    assert abs(pruned_cpp - pruned_hf) <= max(2 * runtime_gap, 0.02), report
