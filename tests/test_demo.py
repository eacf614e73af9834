"""``avss demo`` on a tiny model: three variants against the base, the patched model saved and reloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from avss.demo import DEMO_FORMAT, SAVED, VARIANTS, DemoOptions, run_demo
from avss.pruning.prune import PRUNING_FORMAT
from avss.report import collect, render_markdown
from test_provenance import assert_stamped

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def saved_model(saved_tiny_model) -> Path:
    return saved_tiny_model(6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(FIXTURES / "arc_easy", root / "arc_easy")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "wiki.test.raw").write_text(
        "\n".join(f" = Section {i} = \n The cat sat on mat number {i} ." for i in range(6)) + "\n"
    )
    return root


def test_demo_compares_three_variants_and_reloads_the_patched_model(saved_model, data_dir, tmp_path):
    options = DemoOptions(
        model=str(saved_model),
        samples=4,
        max_length=32,
        batch_size=2,
        ppl_max_length=32,
        wikitext_paragraphs=4,
        arc_examples=4,
        device="cpu",
        data_dir=str(data_dir),
    )
    result = run_demo(tmp_path / "demo", options)
    assert list(result.removed) == [variant.name for variant in VARIANTS]
    assert all(len(removed) == 2 for removed in result.removed.values())  # round(0.25 * 6)
    assert 0 not in result.removed[SAVED]  # the patch protects block 0
    for rows in result.comparisons.values():
        assert {(row["task"], row["kind"]) for row in rows} >= {
            ("perplexity", "perplexity"),
            ("wikitext2", "perplexity"),
            ("arc_easy", "accuracy"),
        }
        assert all(
            row["n"] and row["new"]["low"] <= row["new"]["estimate"] <= row["new"]["high"] for row in rows
        )
    assert result.max_logit_difference_after_reload < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "model")
    assert reloaded.config.num_hidden_layers == 4
    record = json.loads((tmp_path / "demo" / "model" / "avss_pruning.json").read_text())
    assert record["patch"] is not None and record["removed_layers"] == result.removed[SAVED]
    assert_stamped(record, PRUNING_FORMAT)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert_stamped(summary, DEMO_FORMAT)
    assert len(summary["summary"]) == len(VARIANTS) and "retention" in summary["summary"][1]
    page = render_markdown(collect([tmp_path / "demo"]), title="demo")  # the report reads the real writer
    assert "Prune three ways and compare" in page and "block_influence+patch" in page
    header = next(line for line in page.splitlines() if line.startswith("| variant"))
    assert "[95% CI]" in header and "McNemar p (Holm)" in header and "n (paired)" in header
