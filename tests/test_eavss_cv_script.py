"""The cross-validated EAVSS benchmark (benchmarks/eavss_cv.py) end to end on a tiny model and tiny data:
its steps run, resume, keep the test fold out of the layer choice, and make the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _benchmarks import load_benchmark
from test_hallucination import write_jsonl


@pytest.fixture(scope="module")
def eavss_cv():
    return load_benchmark("eavss_cv")


def truthfulqa_dir(root: Path, questions: int = 20) -> Path:
    rows = [(f"tqa_{i:03d}", f"What is fact number {i}?") for i in range(questions)]
    write_jsonl(
        root / "truthfulqa" / "truthfulqa_gen.jsonl",
        [
            {
                "id": id_,
                "question": q,
                "best_answer": f"It is {i}",
                "best_incorrect_answer": f"It is {i + 1}",
                "correct_answers": [f"It is {i}"],
                "incorrect_answers": [f"It is {i + 1}", f"It is {i + 2}"],
            }
            for i, (id_, q) in enumerate(rows)
        ],
    )
    write_jsonl(
        root / "truthfulqa" / "truthfulqa_mc.jsonl",
        [
            {
                "id": id_,
                "question": q,
                "choices": [f"It is {i}", f"It is {i + 1}"],
                "mc1_labels": [1, 0],
                "mc2_choices": [f"It is {i}", f"It is {i + 1}", f"It is {i + 2}"],
                "mc2_labels": [1, 0, 0],
            }
            for i, (id_, q) in enumerate(rows)
        ],
    )
    return root


def test_steps_run_resume_and_table(eavss_cv, saved_tiny_model, tmp_path: Path) -> None:
    data = truthfulqa_dir(tmp_path / "data")
    out = tmp_path / "cv"
    options = [
        "--model", str(saved_tiny_model(4)), "--device", "cpu", "--dtype", "float32", "--data-dir", str(data),
        "--out", str(out), "--k", "2", "--seeds", "1", "--random-draws", "1", "--permutations", "20",
        "--lr", "1e-3", "--epochs", "1", "--transfer-tasks", "", "--autocast", "bf16", "--folds", "2",
    ]  # fmt: skip
    arms = ["base:{}", "train:eavss:0:{}", "train:random:100:{}"]
    steps = ["stats", "ranking", *(arm.format(fold) for arm in arms for fold in (0, 1)), "table"]
    eavss_cv.main([*options, *steps])

    records = {path.stem: json.loads(path.read_text()) for path in (out / "steps").glob("*.json")}
    assert set(records) == {"stats", "ranking"} | {
        arm.format(fold).replace(":", "_") for arm in arms for fold in (0, 1)
    }
    trained = records["train_eavss_0_0"]
    assert trained["mitigation"]["training"]["autocast_dtype"] == "bfloat16"
    assert trained["args"]["autocast"] == "bf16"

    # The EAVSS arm trains the top-k of the training questions' scores: the test fold chooses nothing.
    study = eavss_cv.Study(eavss_cv.parse_args([*options, "table"]))
    assert trained["layers"] == study.fold_scores(0).top(2)
    test_ids = {pair.id for pair in study.pairs(0, "test")}
    train_ids = {pair.id for pair in study.pairs(0, "train")}
    assert test_ids and not test_ids & train_ids
    assert {row["id"] for row in trained["eval"]["records"]["truthfulqa_mc"]} == test_ids

    # A rerun finds every step done and rewrites nothing but the table.
    stamps = {path.name: path.stat().st_mtime_ns for path in (out / "steps").glob("*.json")}
    eavss_cv.main([*options, *steps])
    assert {path.name: path.stat().st_mtime_ns for path in (out / "steps").glob("*.json")} == stamps

    results = json.loads((out / "results.json").read_text())
    assert "train:eavss:0" in results["arms"] and "train:random:100" in results["arms"]


@pytest.mark.parametrize("step", ["train:eavss:0", "train:best:0:0", "base", "tabel"])
def test_unknown_steps_are_refused_before_anything_runs(eavss_cv, tmp_path: Path, step: str) -> None:
    out = tmp_path / "cv"
    with pytest.raises(SystemExit, match=f"unknown step '{step}'"):
        eavss_cv.main(["--out", str(out), "--model", str(tmp_path / "no-model"), "base:0", step])
    assert not out.exists()
