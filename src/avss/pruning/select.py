"""Choosing layers to remove with any scorer, in one shot or iteratively.

One-shot selection scores the model once and takes the budget at once. Iterative selection removes one block,
re-scores the pruned model, and repeats until the budget is spent (the EAVSS paper's procedure); with a
:class:`~avss.scorers.CachedContext` each re-scoring re-runs only the blocks after the removed one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from avss.adapters import remove_layers
from avss.pruning.rules import check_budget
from avss.scorers import LayerImportance, Scorer, ScoringContext


@dataclass
class Selection:
    """Which layers a method removes (original indices) and the scores it based each decision on.

    ``order`` is the order of removal: for an iterative selection (or a one-shot selection by lowest score)
    its first ``k`` entries are the selection for a budget of ``k`` layers, so one run to the largest budget
    serves every smaller one. Rules that are not nested (angular picks a contiguous span per budget) store
    their selection per budget in ``by_budget``.
    """

    method: str
    iterative: bool
    order: list[int]
    steps: list[LayerImportance] = field(default_factory=list)
    by_budget: dict[int, list[int]] = field(default_factory=dict)

    @property
    def removed(self) -> list[int]:
        return sorted(self.order)

    def removed_for(self, n_remove: int) -> list[int]:
        """The layers removed for a budget of ``n_remove`` layers, ascending."""
        return sorted(self.by_budget.get(n_remove, self.order[:n_remove]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "iterative": self.iterative,
            "removed": self.removed,
            "order": self.order,
            "by_budget": self.by_budget,
            "steps": [step.to_dict() for step in self.steps],
        }


def select_oneshot(
    scorer: Scorer, context: ScoringContext, n_remove: int, protect: set[int] | None = None
) -> Selection:
    """Score once and remove the ``n_remove`` layers the scorer picks; the model is not changed."""
    protect = protect or set()
    check_budget(n_remove, context.num_layers, protect)
    importance = scorer.score(context)
    return Selection(scorer.spec, False, scorer.select(importance, n_remove, protect), [importance])


def select_iteratively(
    scorer: Scorer,
    context: ScoringContext,
    n_remove: int,
    protect: set[int] | None = None,
    *,
    done: Selection | None = None,
    on_step: Callable[[Selection], None] | None = None,
) -> Selection:
    """Remove one block at a time from ``context.model`` (in place), re-scoring after each removal.

    ``protect`` holds original layer indices; they are followed through the renumbering after each removal.
    ``done`` is an earlier, unfinished run of the same selection (its first steps): its blocks are removed
    without scoring and the search goes on from there, so a search of hours (leave-one-out on a large
    model) survives an interruption. ``on_step`` receives the selection so far after every step.
    """
    protect = protect or set()
    check_budget(n_remove, context.num_layers, protect)
    original = list(range(context.num_layers))  # original index of each current block
    order: list[int] = []
    steps: list[LayerImportance] = []
    if done is not None:
        for layer in done.order:
            remove(context, original.index(layer), original, order)
        steps = list(done.steps)
    while len(order) < n_remove:
        importance = scorer.score(context)
        current_protect = {index for index, layer in enumerate(original) if layer in protect}
        (layer,) = scorer.select(importance, 1, current_protect)
        remove(context, layer, original, order)
        steps.append(importance)
        if on_step is not None:
            on_step(Selection(scorer.spec, True, list(order), list(steps)))
    return Selection(scorer.spec, True, order, steps)


def remove(context: ScoringContext, layer: int, original: list[int], order: list[int]) -> None:
    """Remove current block ``layer`` from the context's model and record its original index in ``order``."""
    remove_layers(context.model, [layer])
    context.removed(layer)
    order.append(original.pop(layer))


def select_layers(
    scorer: Scorer,
    context: ScoringContext,
    n_remove: int,
    protect: set[int] | None = None,
    iterative: bool = False,
) -> Selection:
    """One-shot or iterative selection; the iterative one removes the selected blocks from the model."""
    choose = select_iteratively if iterative else select_oneshot
    return choose(scorer, context, n_remove, protect)
