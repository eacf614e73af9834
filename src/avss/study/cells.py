"""One evaluated model of a study (:class:`Cell`) and where its files live in the study folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avss.study.config import slug


@dataclass
class Cell:
    """One evaluated model: a method's selection at one budget (``base`` for the unpruned model)."""

    method: str
    mode: str
    fraction: float
    removed: list[int]
    metrics: dict[str, dict[str, float]]
    seconds: float
    reused_from: str | None = None
    threads: int | None = None  # torch's CPU threads while it was evaluated (read its seconds with it)
    processor: str | None = None  # the CPU it was evaluated on (bfloat16 results and seconds depend on it)

    @property
    def key(self) -> str:
        return "base" if self.method == "base" else f"{slug(self.method)}__{self.mode}__{self.fraction:g}"

    @property
    def evaluated_key(self) -> str:
        """The cell whose evaluation this one's metrics are (itself, or the twin it reuses)."""
        return self.reused_from or self.key


def evaluation_path(out: Path, key: str) -> Path:
    """Where a cell's :class:`EvalResult` (with per-example records) is stored: gzip-compressed JSON, a tenth
    of its plain size (``load_evaluations`` also reads the plain files of older folders)."""
    return out / "cells" / f"{key}.eval.json.gz"


def base_on(processor: str) -> str:
    """The key of the unpruned model evaluated on ``processor`` beside the stored base."""
    return f"base@{slug(processor)}"


def tasks_folder(out: Path, key: str) -> Path:
    """Where the tasks a cell has finished wait, one result file each, until the whole cell is written."""
    return out / "cells" / f"{key}.tasks"


# What a finished task must share with this run to stand in a cell evaluated now (the study's config fixes the
# model): the same precision, device, processor and thread count, on which reduced-precision kernels depend.
RUN_IDENTITY = ("dtype", "device", "processor", "threads")
