"""The README's verdict table is the recorded studies' numbers, not a copy that can drift from them.

Chain checked: each study's ``results.json`` -> ``benchmarks/scale.json`` (read again here and compared)
-> the table between the README's verdict markers (written again here and compared). A study that grows
fails this test until ``benchmarks/scale.py ... --readme README.md`` is run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


@pytest.fixture(scope="module")
def recorded() -> list[dict]:
    return json.loads((ROOT / "benchmarks" / "scale.json").read_text(encoding="utf-8"))["studies"]


def test_scale_json_holds_each_study_results_as_recorded(scale, recorded):
    for study in recorded:
        again = scale.read_study(ROOT / study["folder"], parameters=False)
        for key in (
            "model",
            "num_layers",
            "complete",
            "wikitext_documents",
            "entries",
            "protected",
            "iterative",
        ):
            assert again[key] == study[key], f"{study['folder']}: {key} differs; run benchmarks/scale.py"


def test_readme_verdict_table_is_the_one_written_from_the_studies(scale, recorded):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert scale.with_verdict(readme, scale.verdict_table(recorded)) == readme


def test_verdict_table_marks_the_best_method_and_lists_a_few_draws_one_by_one(scale):
    def entry(method, retention, removed="0 1"):
        return {
            "method": method,
            "fraction": 0.25,
            "retention": retention,
            "retention_low": retention - 0.1,
            "retention_high": retention + 0.1,
            "removed_layers": removed,
        }

    study = {
        "folder": "s",
        "model": "smollm2-135m",
        "entries": [
            entry("avss", 0.1),
            entry("first", 0.1),
            entry("angular", 0.8, "5 6"),
            entry("random", 0.5),
            entry("random[seed=1]", 0.25),
        ],
        "protected": [entry("avss", 0.3, "1 2")],
        "iterative": [entry("loo_nll[batches=8]", 0.6, "5 7")],
    }
    table = scale.verdict_table([study]).splitlines()
    assert table[0] == "| method | SmolLM2 25% |"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |") for line in table[2:]}
    assert rows["AVSS as specified"] == "0.100 [0.000, 0.200]"
    assert rows["angular distance (Gromov et al.)"] == "**0.800 [0.700, 0.900]**"
    assert rows["AVSS, first and last block protected"] == "0.300 [0.200, 0.400]"
    assert rows["first n"] == "= AVSS"
    sleb = "leave-one-out NLL, iterative (SLEB), on 64 x 512 calibration tokens"
    assert rows[sleb] == "0.600 [0.500, 0.700]"
    assert rows["block influence (ShortGPT)"] == "not run"
    assert rows["random blocks: median [5%, 95%] of the draws"] == "2 draws so far: 0.500, 0.250"
    assert scale.band_text([entry("random", 0.5)], 0.25) == "1 draw so far: 0.500"


def test_a_row_that_removes_avss_blocks_says_so_and_the_best_is_bold(scale):
    def entry(method: str, removed: list[int], retention: float) -> dict:
        low, high = retention - 0.1, retention + 0.1
        return {
            "method": method,
            "fraction": 0.25,
            "removed_layers": removed,
            **{"retention": retention, "retention_low": low, "retention_high": high},
        }

    avss, first, influence = (
        entry("avss", [0, 1], 0.0),
        entry("first", [0, 1], 0.0),
        entry("block_influence", [5, 6], 0.6),
    )
    study = {"entries": [avss, first, influence], "protected": [], "iterative": [entry("avss", [0, 1], 0.0)]}
    labels = [label for label, _, _ in scale.VERDICT_ROWS]
    column = dict(zip(labels, scale.verdict_column(study, 0.25)[: len(labels)], strict=True))
    assert column["AVSS as specified"] == "0.000 [-0.100, 0.100]"
    assert column["AVSS, iterative (re-scored after each removal)"] == "= AVSS"
    assert column["first n"] == "= AVSS"
    assert column["block influence (ShortGPT)"] == "**0.600 [0.500, 0.700]**"
    assert column["angular distance (Gromov et al.)"] == "not run"
