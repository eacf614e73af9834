"""Resumable scoring: a run interrupted after k batches and resumed gives exactly the uninterrupted result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _tiny import tiny_model, tiny_tokenizer
from avss.cli import main
from avss.data import CalibrationOptions
from avss.errors import CheckpointError
from avss.models import LoadedModel
from avss.scorers.run import ScoreOptions, ScoreRun, score
from avss.stats.checkpoint import StatisticsCheckpoint, checkpoint_file
from avss.stats.collect import StatisticsCollector

CALIBRATION = CalibrationOptions(samples=10, max_length=24, batch_size=2, seed=0)  # 5 batches
OPTIONS = ScoreOptions(measure_sites=("mlp", "delta"))
CLI_FAST = ["--samples", "10", "--max-length", "24", "--batch-size", "2", "--device", "cpu"]


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of the statistics pass."""


def interrupt_after(
    monkeypatch: pytest.MonkeyPatch, batches: int, error: type[BaseException] = Interrupted
) -> None:
    """Make the statistics pass die when it reaches batch number ``batches + 1``."""
    observe = StatisticsCollector.observe
    seen = {"count": 0}

    def dying_observe(self: StatisticsCollector, batch: dict) -> None:
        if seen["count"] == batches:
            raise error()
        seen["count"] += 1
        observe(self, batch)

    monkeypatch.setattr(StatisticsCollector, "observe", dying_observe)


@pytest.fixture
def loaded() -> LoadedModel:
    return LoadedModel(tiny_model("llama", 4), tiny_tokenizer(), {"name": "tiny-llama"})


def run(loaded: LoadedModel, checkpoint: StatisticsCheckpoint | None = None, **changes: object) -> ScoreRun:
    calibration = CalibrationOptions(**{**CALIBRATION.__dict__, **changes})
    return score(loaded, calibration=calibration, options=OPTIONS, progress=False, checkpoint=checkpoint)


@pytest.mark.parametrize(("every", "stop", "saved"), [(1, 3, 3), (2, 3, 2), (3, 1, 0)])
def test_resume_matches_uninterrupted_run_exactly(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int, stop: int, saved: int
) -> None:
    reference = run(loaded)
    path = tmp_path / "scores.json.checkpoint.json"
    with monkeypatch.context() as patched:
        interrupt_after(patched, stop)
        with pytest.raises(Interrupted):
            run(loaded, StatisticsCheckpoint(path, every=every))
    if saved:
        assert json.loads(path.read_text())["batches_done"] == saved
    else:
        assert not path.exists()

    resumed = run(loaded, StatisticsCheckpoint(path, every=every, resume=True))

    assert resumed.provenance["resumed_at_batch"] == saved
    assert resumed.stats.state_dict() == reference.stats.state_dict()
    assert resumed.scores.to_dict() == reference.scores.to_dict()


def test_a_resumed_run_keeps_checkpointing_and_leaves_no_temporary_files(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.checkpoint.json"
    with monkeypatch.context() as patched:
        interrupt_after(patched, 3)
        with pytest.raises(Interrupted):
            run(loaded, StatisticsCheckpoint(path, every=2))
    assert json.loads(path.read_text())["batches_done"] == 2
    with monkeypatch.context() as patched:
        interrupt_after(patched, 2)  # batches 3 and 4 of the run, then dies
        with pytest.raises(Interrupted):
            run(loaded, StatisticsCheckpoint(path, every=2, resume=True))
    assert json.loads(path.read_text())["batches_done"] == 4
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_resume_refuses_a_checkpoint_from_another_run(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.json"
    with monkeypatch.context() as patched:
        interrupt_after(patched, 2)
        with pytest.raises(Interrupted):
            run(loaded, StatisticsCheckpoint(path))
    with pytest.raises(CheckpointError, match=r"different run \(differs in: calibration, num_batches\)"):
        run(loaded, StatisticsCheckpoint(path, resume=True), samples=4)


def test_unreadable_checkpoint_is_reported(loaded: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.json"
    path.write_text(
        '{"format": "avss-statistics-checkpoint/1", "run": {}, "batches_done": 2, "stats": {"sites"'
    )
    with pytest.raises(CheckpointError, match="unreadable"):
        run(loaded, StatisticsCheckpoint(path, resume=True))


def test_resume_without_a_checkpoint_starts_from_the_beginning(loaded: LoadedModel, tmp_path: Path) -> None:
    resumed = run(loaded, StatisticsCheckpoint(tmp_path / "none.json", resume=True))
    assert resumed.provenance["resumed_at_batch"] == 0
    assert resumed.stats.state_dict() == run(loaded).stats.state_dict()


def avss(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["avss", *argv])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def tiny_dir(saved_tiny_model) -> Path:
    return saved_tiny_model(4)


def test_cli_score_resume_after_interrupt(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, out = tmp_path / "reference.json", tmp_path / "scores.json"
    assert avss(["score", str(tiny_dir), *CLI_FAST, "--out", str(reference)], monkeypatch) == 0

    with monkeypatch.context() as patched:
        interrupt_after(patched, 3, KeyboardInterrupt)
        args = ["score", str(tiny_dir), *CLI_FAST, "--out", str(out), "--checkpoint-every", "1"]
        assert avss(args, patched) != 0
    assert not out.exists()
    assert json.loads(checkpoint_file(out).read_text())["batches_done"] == 3

    assert avss([*args, "--resume"], monkeypatch) == 0
    result, expected = json.loads(out.read_text()), json.loads(reference.read_text())
    assert result["resumed_at_batch"] == 3
    assert result["layers"] == expected["layers"]
    assert not checkpoint_file(out).exists(), "a finished run removes its checkpoint"


def test_cli_resume_needs_out(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert avss(["score", str(tiny_dir), *CLI_FAST, "--resume"], monkeypatch) == 2
    assert "need --out" in capsys.readouterr().err
