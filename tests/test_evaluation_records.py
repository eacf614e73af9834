"""Per-example records in result files, and comparisons computed from the files alone (no model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from avss.errors import DataError
from avss.evaluation import EvalResult, TaskResult
from avss.evaluation.records import ExampleRecord
from avss.evaluation.runner import RESULT_FORMAT
from avss.evaluation.uncertainty import Bootstrap, PairingError, holm, mcnemar
from avss.provenance import Provenance


def mc_records(correct: list[int], labels: list[int] | None = None) -> list[ExampleRecord]:
    """4-option records; the prediction is the label when correct, else the next option."""
    labels = labels or [i % 4 for i in range(len(correct))]
    return [
        ExampleRecord(
            id=f"q{i}",
            metrics={"accuracy": float(ok)},
            prediction=label if ok else (label + 1) % 4,
            label=label,
            scores=[-1.0, -2.0, -3.0, -4.0],
            option_lengths=[5, 3, 9, 2],
            num_options=4,
        )
        for i, (ok, label) in enumerate(zip(correct, labels, strict=True))
    ]


def ppl_records(nll: list[float], tokens: list[int]) -> list[ExampleRecord]:
    return [
        ExampleRecord(id=f"wikitext2:{i}", nll=v, num_tokens=t)
        for i, (v, t) in enumerate(zip(nll, tokens, strict=True))
    ]


def task(records: list[ExampleRecord]) -> TaskResult:
    if records and records[0].nll is not None:
        nll, tokens = sum(r.nll for r in records), sum(r.num_tokens for r in records)
        metrics = {"perplexity": math.exp(nll / tokens)}
    else:
        metrics = {name: sum(r.metrics[name] for r in records) / len(records) for name in records[0].metrics}
    return TaskResult(metrics, len(records), {}, [], 0.1, records)


def result(**tasks: list[ExampleRecord]) -> EvalResult:
    provenance = Provenance.now(RESULT_FORMAT, model={"class": "Tiny"})
    return EvalResult({name: task(r) for name, r in tasks.items()}, {}, 1.0, provenance)


BASE_SCIQ = [1] * 30 + [0] * 10  # 0.75
# The pruned model loses 8 of the base's right answers and gains 1: 23/40.
NEW_SCIQ = [1] * 22 + [0] * 8 + [1] + [0] * 9
BASE_ARC = [1, 0, 0, 0] * 10  # chance level
NEW_ARC = BASE_ARC
NLL, TOKENS = [30.0, 12.0, 55.0, 20.0], [10, 4, 20, 8]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    base = result(
        sciq=mc_records(BASE_SCIQ), arc=mc_records(BASE_ARC), wikitext2=ppl_records(NLL, TOKENS)
    ).save(tmp_path / "base.json")
    new = result(
        sciq=mc_records(NEW_SCIQ),
        arc=mc_records(NEW_ARC),
        wikitext2=ppl_records([v + 0.25 * t for v, t in zip(NLL, TOKENS, strict=True)], TOKENS),
    ).save(tmp_path / "new.json")
    return base, new


def test_records_round_trip_through_the_result_file(files: tuple[Path, Path]) -> None:
    base, _ = files
    raw = json.loads(base.read_text())
    assert raw["format"] == "avss-eval/2"
    assert raw["tasks"]["wikitext2"]["records"][1] == {
        "id": "wikitext2:1",
        "metrics": {},
        "nll": 12.0,
        "num_tokens": 4,
    }
    loaded = EvalResult.load(base)
    assert loaded.tasks["sciq"].records == mc_records(BASE_SCIQ)
    assert loaded.tasks["wikitext2"].records == ppl_records(NLL, TOKENS)


def test_a_gzipped_result_file_round_trips_and_is_reproducible(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    """``.gz`` results (a study's cells) load as the plain file does; saving twice gives the same bytes (no
    timestamp in the gzip header), and a damaged file is a DataError."""
    result = EvalResult.load(files[0])
    first, second = tmp_path / "a.eval.json.gz", tmp_path / "b.eval.json.gz"
    result.save(first)
    result.save(second)
    assert first.read_bytes() == second.read_bytes() and first.read_bytes()[:2] == b"\x1f\x8b"
    assert EvalResult.load(first).to_dict() == result.to_dict()
    first.write_bytes(first.read_bytes()[:40])
    with pytest.raises(DataError, match="not an avss eval results file"):
        EvalResult.load(first)


def test_comparison_from_files_alone(files: tuple[Path, Path]) -> None:
    base, new = (EvalResult.load(path) for path in files)
    rows = {(row.task, row.metric): row for row in new.compare(base).rows}
    sciq = rows[("sciq", "accuracy")]
    assert sciq.kind == "accuracy" and sciq.n == 40
    assert sciq.base.estimate == 0.75 and sciq.new.estimate == pytest.approx(23 / 40)
    assert sciq.difference.estimate == pytest.approx(23 / 40 - 0.75)
    assert sciq.difference.high < 0  # 8 lost, 1 gained: the paired interval excludes 0
    # 8 vs 1 discordant pairs: 2 * (1 + 9) / 512.
    assert (sciq.mcnemar.base_only, sciq.mcnemar.new_only) == (8, 1)
    assert sciq.mcnemar.p_value == pytest.approx(20 / 512)
    arc = rows[("arc", "accuracy")]
    assert arc.mcnemar.p_value == 1.0
    assert [sciq.holm_p, arc.holm_p] == pytest.approx(holm([20 / 512, 1.0]))
    assert sciq.chance == 0.25
    assert sciq.retention.estimate == pytest.approx((23 / 40 - 0.25) / (0.75 - 0.25))
    assert sciq.included  # 30/40 right, majority class 10/40, longest answer (option 2) 10/40
    assert not arc.included and "not above chance 0.2500" in arc.inclusion_reason
    ppl = rows[("wikitext2", "perplexity")]
    assert ppl.kind == "perplexity" and ppl.difference_unit == "nats per token"
    assert ppl.difference.estimate == pytest.approx(0.25)  # a quarter nat more on every token
    assert ppl.difference.low == pytest.approx(0.25) and ppl.difference.high == pytest.approx(0.25)
    assert ppl.base.estimate == pytest.approx(math.exp(117 / 42))
    assert ppl.mcnemar is None and ppl.retention is None
    # The saved table is plain JSON.
    json.dumps(new.compare(base, Bootstrap(100)).to_dict())


def test_mcnemar_in_the_table_is_the_plain_test(files: tuple[Path, Path]) -> None:
    base, new = (EvalResult.load(path) for path in files)
    [row] = [row for row in new.compare(base).rows if row.task == "sciq"]
    assert row.mcnemar == mcnemar(BASE_SCIQ, NEW_SCIQ)


def test_task_intervals_and_baselines() -> None:
    sciq = task(mc_records(BASE_SCIQ))
    interval = sciq.interval("accuracy")
    assert interval.estimate == 0.75 and interval.low < 0.75 < interval.high and interval.n == 40
    assert set(sciq.summary()) == {"accuracy"}
    assert sciq.baselines() == {"majority class": 0.25, "longest answer": 0.25}
    assert sciq.inclusion("accuracy").included
    # Every label 1 and a 0.6-accurate model: the majority class (1.0) beats it, so it is excluded.
    skewed = task(mc_records([1] * 30 + [0] * 20, labels=[1] * 50))
    decision = skewed.inclusion("accuracy")
    assert not decision.included and "majority class baseline 1.0000" in decision.reason


def test_different_example_sets_cannot_be_compared(files: tuple[Path, Path]) -> None:
    base = EvalResult.load(files[0])
    fewer = result(sciq=mc_records(BASE_SCIQ[:39]))
    with pytest.raises(PairingError, match="task sciq: the two results were scored on different examples"):
        fewer.compare(base)


def test_old_result_files_load_without_records(tmp_path: Path) -> None:
    old = {
        "format": "avss-eval/1",
        "model": {"name": "tiny"},
        "tasks": {
            "sciq": {"metrics": {"accuracy": 0.5}, "num_examples": 20, "config": {}, "data": [], "seconds": 1}
        },
        "options": {},
        "versions": {},
        "wall_time_s": 2.0,
        "created": "2026-01-01T00:00:00+00:00",
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = EvalResult.load(path)
    assert loaded.tasks["sciq"].records == [] and loaded.format == "avss-eval/1"
    with pytest.raises(DataError, match="no per-example records"):
        loaded.tasks["sciq"].interval("accuracy")
    [row] = loaded.compare(loaded).rows
    assert row.note == "no per-example records" and row.base == 0.5 and row.difference is None
    path.write_text(json.dumps({**old, "format": "avss-eval/9"}))
    with pytest.raises(DataError, match="avss-eval/9"):
        EvalResult.load(path)


def test_a_perplexity_metric_without_per_document_nll_is_reported_without_intervals() -> None:
    records = mc_records(BASE_SCIQ)
    tasks = {"x": TaskResult({"perplexity": 9.0}, 40, {}, [], 0.1, records)}
    broken = EvalResult(tasks, {}, 1.0, Provenance.now(RESULT_FORMAT))
    [row] = broken.compare(broken).rows
    assert row.kind == "perplexity" and row.note == "no per-document NLL" and row.difference is None
    with pytest.raises(DataError, match="no per-document NLL"):
        broken.tasks["x"].interval("perplexity")
