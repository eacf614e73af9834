"""The comparison study: every method x every budget, pruned and evaluated on the same data.

For each method and each fraction the base model is copied in memory, the method's layers are removed and
the copy is evaluated with :func:`avss.evaluation.evaluate`. Selections come from one shared scoring context
(one statistics pass for every hook-based method); with ``iterative`` each activation-based method is also run
iteratively once to the largest budget, whose removal order yields every smaller budget.

Every finished cell is written atomically to ``cells/`` with its evaluation result (per-example records) and
skipped on a rerun; within a cell, every finished task is kept in ``cells/<key>.tasks/`` until the cell ends,
so an interrupted study loses at most the task in progress (a cell of a 1.5B model takes hours on a CPU).
Two cells that remove the same layers are the same model, so the second reuses the first one's result
(recorded as ``reused_from``).

Controls: ``random_seeds`` draws of the random order give a null band instead of one draw; ``protect``
evaluates every one-shot selection again with those blocks kept (``oneshot+protect``). The statistics of the
tables (intervals, paired tests, retention, the inclusion rule) are computed from the records by
:mod:`avss.study.analysis`.

The package follows the run: :mod:`~avss.study.config` (what defines a study), :mod:`~avss.study.selections`
(which blocks each method removes), :mod:`~avss.study.cells` (one evaluated model and its files),
:mod:`~avss.study.runner` (running and resuming), :mod:`~avss.study.result` and :mod:`~avss.study.analysis`
(the tables).
"""

from avss.study.cells import Cell
from avss.study.config import (
    DEFAULT_FRACTIONS,
    DEFAULT_TASKS,
    REPAIRS,
    StudyConfig,
    parse_limits,
    selection_name,
    slug,
)
from avss.study.result import STUDY_FORMAT, StudyResult, rank_correlations
from avss.study.runner import Study

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_TASKS",
    "REPAIRS",
    "STUDY_FORMAT",
    "Cell",
    "Study",
    "StudyConfig",
    "StudyResult",
    "parse_limits",
    "rank_correlations",
    "selection_name",
    "slug",
]
