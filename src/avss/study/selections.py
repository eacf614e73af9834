"""The layers each method removes at every budget of a study, and their files in ``selections/``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from avss.pruning.rules import check_budget
from avss.pruning.select import Selection
from avss.pruning.sublayers import equal_parameter_budget
from avss.scorers import LayerImportance, Scorer
from avss.study.config import budget


def oneshot_order(
    scorer: Scorer,
    importance: LayerImportance,
    fractions: Sequence[float],
    protect: set[int] | None = None,
) -> Selection:
    """A one-shot selection for every budget from one set of scores; ``order`` lists layers by ascending
    score.

    Each budget's layers come from the scorer's own rule (angular picks a contiguous span per budget), never
    touching ``protect``, and are stored in ``by_budget``.
    """
    protect = protect or set()
    num_layers = importance.num_layers
    check_budget(max(budget(f, num_layers) for f in fractions), num_layers, protect)
    order = [layer for layer in importance.ranking() if layer not in protect]
    selection = Selection(scorer.spec, False, order, [importance])
    for fraction in fractions:
        n = budget(fraction, num_layers)
        if n:
            selection.by_budget[n] = scorer.select(importance, n, protect)
    return selection


def attention_budgets(selection: Selection, fractions: Sequence[float], model: Any) -> Selection:
    """Fill ``selection.by_budget`` (attention sublayers by ascending score in ``order``): each block budget
    maps to the lowest-scoring sublayers holding as many parameters
    (:func:`avss.pruning.sublayers.equal_parameter_budget`), for the budgets attention can meet."""
    for fraction in fractions:
        n = budget(fraction, len(selection.order))
        if not n or n in selection.by_budget:
            continue
        if (sublayers := equal_parameter_budget(model, n, "attn")).feasible:
            selection.by_budget[n] = sorted(selection.order[: sublayers.sublayers])
    return selection


def partial_path(path: Path) -> Path:
    """Where an unfinished iterative selection keeps its steps (``NAME.json.partial``: no selection file)."""
    return path.with_name(path.name + ".partial")


def selection_from_dict(raw: dict[str, Any]) -> Selection:
    """A :class:`Selection` read back from its file in ``selections/`` (scores as float64 tensors)."""
    steps = [
        LayerImportance(
            step["method"],
            torch.tensor(step["scores"], dtype=torch.float64),
            step["options"],
            warnings=step["warnings"],
        )
        for step in raw["steps"]
    ]
    by_budget = {int(k): v for k, v in raw.get("by_budget", {}).items()}
    return Selection(raw["method"], raw["iterative"], raw["order"], steps, by_budget)
