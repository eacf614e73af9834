"""Calibration stability: Jaccard by hand, identical sets agree exactly, disjoint parts are disjoint."""

from __future__ import annotations

import json
import random

import pytest

from _benchmarks import load_benchmark
from _tiny import tiny_model, tiny_tokenizer
from avss.data import CalibrationOptions, TextSource, tokenize_texts
from avss.errors import DataError, OptionError
from avss.io import atomic_write_json
from avss.models import LoadedModel
from avss.scorers import stability
from avss.scorers.stability import CalibrationSet, SetScores, calibration_stability, jaccard

_WORDS = random.Random(0).choices(
    ["river", "stone", "field", "light", "cold", "north", "salt", "wind"], k=3000
)
TEXT = " ".join(_WORDS)  # aperiodic, so no two calibration windows are the same text


def test_jaccard_hand_values():
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 4)
    assert jaccard([0], [5]) == 0.0
    assert jaccard([], []) == 1.0


def test_parts_of_one_text_are_disjoint_and_a_missing_part_is_an_error(tokenizer):
    parts = [tokenize_texts(tokenizer, [TEXT], samples=4, max_length=16, part=k) for k in range(3)]
    rows = [{tuple(row.tolist()) for batch in p.batches for row in batch["input_ids"]} for p in parts]
    assert all(len(r) == 4 for r in rows)
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2]) and not (rows[0] & rows[2])
    with pytest.raises(DataError, match="calibration part 999 needs"):
        tokenize_texts(tokenizer, [TEXT], samples=4, max_length=16, part=999)


def test_identical_sets_agree_and_disjoint_sets_are_measured(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    loaded = LoadedModel(tiny_model("llama", 6), tiny_tokenizer(), {"name": "tiny"})
    source = TextSource(data=str(data))

    def part(k: int, name: str | None = None) -> CalibrationSet:
        options = CalibrationOptions(samples=4, max_length=24, part=k)
        return CalibrationSet(name or f"part{k}", source, options)

    methods = ["avss", "block_influence", "random", "first"]
    same = calibration_stability(loaded, methods, [part(0), part(0, "again")], budgets=[1, 2])
    assert [m.method for m in same.methods] == ["avss", "block_influence"]  # position baselines skipped
    for method in same.methods:
        assert method.jaccard == {1: {"mean": 1.0, "min": 1.0}, 2: {"mean": 1.0, "min": 1.0}}
        assert method.score_cv == pytest.approx(0.0, abs=1e-12)
        assert method.score_spearman == pytest.approx(1.0)
    other = calibration_stability(loaded, methods, [part(0), part(1), part(2)], budgets=[2])
    for method in other.methods:
        assert 0.0 <= method.jaccard[2]["min"] <= method.jaccard[2]["mean"] <= 1.0
        assert len(method.selections[2]) == 3 and method.score_cv > 0
    assert "| avss |" in other.markdown()
    with pytest.raises(OptionError, match="distinct names"):
        calibration_stability(loaded, methods, [part(0), part(1, "part0")], budgets=[2])


def test_a_run_resumes_by_set_and_rescores_what_changed(tmp_path, monkeypatch):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    loaded = LoadedModel(tiny_model("llama", 6), tiny_tokenizer(), {"name": "tiny"})
    source = TextSource(data=str(data))
    cut = [CalibrationOptions(samples=4, max_length=24, part=k) for k in (0, 1, 2)]
    sets = [CalibrationSet(f"part{k}", source, cut[k]) for k in (0, 1)]
    kept: dict[str, SetScores] = {}

    def keep(scored: SetScores) -> None:  # through JSON, as the benchmark script keeps them
        kept[scored.set["name"]] = SetScores.from_dict(json.loads(json.dumps(scored.to_dict())))

    first = calibration_stability(loaded, ["avss", "angular"], sets, [1, 2], on_set=keep)
    assert sorted(kept) == ["part0", "part1"]

    scored: list[str] = []
    real = stability.score_set
    monkeypatch.setattr(stability, "score_set", lambda *a, **k: scored.append(a[2].name) or real(*a, **k))
    again = calibration_stability(loaded, ["avss", "angular"], sets, [1, 2], done=kept)
    assert scored == [] and again.to_dict() == first.to_dict()
    moved = [sets[0], CalibrationSet("part1", source, cut[2])]
    calibration_stability(loaded, ["avss", "angular"], moved, [1, 2], done=kept)
    assert scored == ["part1"]  # same name, another cut: scored again
    calibration_stability(loaded, ["avss", "angular"], sets, [1, 3], done=kept)
    assert scored == ["part1", "part0", "part1"]  # a budget not kept: both scored again
    with pytest.raises(OptionError, match="between 1 and 5 of 6 blocks"):
        calibration_stability(loaded, ["avss"], sets, [6])


def test_the_benchmark_script_reuses_only_sets_of_its_own_model_and_dtype(tmp_path):
    script = load_benchmark("calibration_stability")
    kept = SetScores({"name": "c4-part0"}, {"avss": [0.5, 1.0]}, {1: {"avss": [0]}}, 3.0)
    atomic_write_json(tmp_path / "c4-part0.json", {"model": "m", "dtype": "float32", **kept.to_dict()})
    assert script.scored_sets(tmp_path, {"model": "m", "dtype": "float32"}) == {"c4-part0": kept}
    with pytest.raises(SystemExit, match="scored with m in float32; use another --out"):
        script.scored_sets(tmp_path, {"model": "m", "dtype": "bfloat16"})
