"""Resumable statistics passes: the merged statistics are saved every N batches and a rerun continues there.

Statistics are mergeable sums (count, mean, M2, ...), so the state after ``k`` batches is all a pass needs to
go on; continuing from it folds the remaining batches in the same order with the same float64 arithmetic and
gives exactly the uninterrupted result. The snapshot is JSON (float64 values round-trip exactly through
Python's float repr) written atomically beside the output, so a killed run leaves the previous checkpoint.

A checkpoint records a fingerprint of everything that decides the batches and what is measured (model, data
with its hash, calibration and score options). Resuming a different run is refused rather than silently mixing
two runs' statistics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avss.errors import CheckpointError
from avss.io import atomic_write_json, to_json
from avss.stats.accumulators import ActivationStats

FORMAT = "avss-statistics-checkpoint/1"


CHECKPOINT_SUFFIX = ".checkpoint"


def checkpoint_dir(out: str | Path) -> Path:
    """Where a training command writing ``out`` (``avss heal``, ``avss mitigate``) keeps its per-epoch
    checkpoints: the folder ``<out>.checkpoint`` beside it, visible so a user sees what a rerun with
    ``--resume`` will continue from."""
    out = Path(out)
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


def checkpoint_file(out: str | Path) -> Path:
    """Where a statistics pass writing ``out`` (``avss score``) keeps its checkpoint: the file
    ``<out>.checkpoint.json`` beside it (the name of :func:`checkpoint_dir` as a JSON file)."""
    out = Path(out)
    return out.with_name(out.name + CHECKPOINT_SUFFIX + ".json")


def is_checkpoint(name: str) -> bool:
    """Whether a file or folder name is one of the checkpoints above, so listings of outputs can skip it."""
    return name.endswith((CHECKPOINT_SUFFIX, CHECKPOINT_SUFFIX + ".json"))


def canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON (tuples become lists), so saved and fresh ones compare."""
    return json.loads(to_json(fingerprint))


@dataclass
class Progress:
    """Statistics after the first ``batches_done`` batches of a run."""

    stats: ActivationStats | None = None
    batches_done: int = 0


@dataclass
class StatisticsCheckpoint:
    """Save the merged statistics every ``every`` batches to ``path``; with ``resume``, start from them.

    ``every=0`` never saves (a plain ``--resume`` of a run that was checkpointed before).
    """

    path: Path
    every: int = 1
    resume: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.every < 0:
            raise CheckpointError(
                f"--checkpoint-every must be 0 (off) or a positive number, got {self.every}"
            )

    def restore(self, fingerprint: dict[str, Any]) -> Progress:
        """The saved progress of this exact run, or a fresh start when not resuming or nothing was saved."""
        if not self.resume or not self.path.is_file():
            return Progress()
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("format") != FORMAT:
                raise ValueError(f"unknown format {saved.get('format')!r}")
            stats = ActivationStats.from_state_dict(saved["stats"])
            batches_done = int(saved["batches_done"])
            recorded = dict(saved["run"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.path} is unreadable ({exc}); delete it to start over"
            ) from exc
        expected = canonical(fingerprint)
        differing = sorted(
            key for key in expected.keys() | recorded.keys() if expected.get(key) != recorded.get(key)
        )
        if differing:
            raise CheckpointError(
                f"checkpoint {self.path} belongs to a different run (differs in: {', '.join(differing)}); "
                "rerun with the same model, data and options, or delete the checkpoint to start over"
            )
        return Progress(stats, batches_done)

    def save(self, fingerprint: dict[str, Any], stats: ActivationStats, batches_done: int) -> None:
        atomic_write_json(
            self.path,
            {"format": FORMAT, "run": fingerprint, "batches_done": batches_done, "stats": stats.state_dict()},
        )

    def on_batch(self, fingerprint: dict[str, Any], start: int) -> Callable[[ActivationStats, int], None]:
        """A ``collect_statistics`` callback that saves after every ``every``-th batch (counted from the run's
        first batch, so resumed runs keep the same schedule)."""

        def save_every(stats: ActivationStats, index: int) -> None:
            done = start + index + 1
            if self.every and done % self.every == 0:
                self.save(fingerprint, stats, done)

        return save_every

    def finish(self) -> None:
        """Remove the checkpoint once the complete result is written; it has nothing left to resume."""
        self.path.unlink(missing_ok=True)


def checkpoint_for_output(out: str | Path | None, every: int, resume: bool) -> StatisticsCheckpoint | None:
    """The checkpoint of a command writing ``out``, or ``None`` when neither saving nor resuming is asked."""
    if not every and not resume:
        return None
    if out is None:
        raise CheckpointError("--checkpoint-every and --resume need --out: the checkpoint is kept beside it")
    return StatisticsCheckpoint(checkpoint_file(out), every=every, resume=resume)
