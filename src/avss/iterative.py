"""Choosing layers to remove with any scorer, in one shot or iteratively.

One-shot selection scores the model once and takes the budget at once. Iterative selection removes one block,
re-scores the pruned model, and repeats until the budget is spent (the EAVSS paper's procedure); with a
:class:`~avss.scorers.CachedContext` each re-scoring re-runs only the blocks after the removed one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from avss.adapters import get_adapter
from avss.data import TextSource
from avss.errors import PruneConfigError
from avss.models import LoadedModel
from avss.patch import check_linear_patch, linear_patch
from avss.pipeline import CalibrationOptions
from avss.prune import PruneResult, PruneSpec, PruningRecord, check_budget, remove_layers
from avss.scorers import LayerImportance, Scorer, ScoringContext, context_for
from avss.sublayers import remove_sublayers, sublayer_record

GIVEN = "layers"  # the method recorded when the blocks to remove are given (avss prune --layers)


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
    scorer: Scorer, context: ScoringContext, n_remove: int, protect: set[int] | None = None
) -> Selection:
    """Remove one block at a time from ``context.model`` (in place), re-scoring after each removal.

    ``protect`` holds original layer indices; they are followed through the renumbering after each removal.
    """
    protect = protect or set()
    check_budget(n_remove, context.num_layers, protect)
    original = list(range(context.num_layers))  # original index of each current block
    order, steps = [], []
    for _ in range(n_remove):
        importance = scorer.score(context)
        current_protect = {index for index, layer in enumerate(original) if layer in protect}
        (layer,) = scorer.select(importance, 1, current_protect)
        remove_layers(context.model, [layer])
        context.removed(layer)
        order.append(original.pop(layer))
        steps.append(importance)
    return Selection(scorer.spec, True, order, steps)


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


def prune_with_scorer(
    loaded: LoadedModel,
    scorer: Scorer | None,
    source: TextSource,
    calibration: CalibrationOptions,
    spec: PruneSpec,
    iterative: bool = False,
    progress: bool = True,
) -> tuple[PruneResult, Selection]:
    """Select layers of ``loaded.model`` with ``scorer`` and remove them in place: all of ``avss prune``
    before saving, whatever the method.

    The budget comes from ``spec`` (``count`` rule; ``mass`` only applies to one-shot normalized scores).
    One-shot activation scorers stream their statistics (memory flat in the calibration tokens); the residual
    cache of :class:`~avss.scorers.CachedContext` is kept only where it saves passes: iterative re-scoring and
    scorers that skip blocks. ``spec.patch`` fits and folds the linear patch (:mod:`avss.patch`) on the same
    calibration batches before the blocks are removed; the architecture and memory are checked first.
    ``spec.layers`` gives the blocks to remove: they are checked against the model and removed without any
    scoring pass (``scorer`` may be ``None``; the record's method is ``layers``). ``spec.sublayer`` removes
    that sublayer of the selected blocks instead (:mod:`avss.sublayers`): the scores rank sublayers, every
    block is kept (``removed_layers`` is empty) and the record's ``sublayers`` entry lists what went.
    """
    started = time.perf_counter()
    spec.check(iterative)
    adapter = get_adapter(loaded.model)
    num_layers = adapter.num_layers
    if spec.sublayer is not None:
        adapter.sublayer_path(spec.sublayer)  # no separable sublayers: refused before scoring
    scoring = spec.layers is None
    if not scoring:  # the blocks are given: checked right after loading, and no scoring pass
        spec.check_given_layers(iterative, num_layers)
    elif scorer is None:
        raise PruneConfigError("a scorer is needed unless the blocks to remove are given (PruneSpec.layers)")
    batches = calibration.batches(loaded.tokenizer, source) if scoring or spec.patch else None
    if spec.patch is not None:
        check_linear_patch(loaded.model, batches.batches)
    protect = spec.protected(num_layers)
    if not scoring:
        selection = Selection(GIVEN, False, sorted(spec.layers or ()))
    else:
        cached = iterative or scorer.skips_blocks
        context = context_for(loaded.model, batches, [scorer], cached=cached, progress=progress)
        if spec.rule == "mass":
            if iterative:
                raise PruneConfigError(
                    "--rule mass cannot be combined with --iterative; use --fraction or --n-layers"
                )
            importance = scorer.score(context)
            selection = Selection(scorer.spec, False, spec.select(importance.scores), [importance])
        else:
            selection = select_layers(
                scorer, context, spec.layers_to_remove(num_layers), protect, iterative=iterative
            )
    patch = None
    if spec.patch is not None:
        patch = linear_patch(loaded.model, batches.batches, selection.removed, spec.patch_ridge, progress)
    sublayers = None
    if spec.sublayer is not None:
        parameters = remove_sublayers(loaded.model, spec.sublayer, selection.removed)
        sublayers = sublayer_record(loaded.model, spec.sublayer, selection.removed, parameters)
    elif not iterative:
        remove_layers(loaded.model, selection.removed)
    removed_blocks = [] if spec.sublayer is not None else selection.removed
    kept = [layer for layer in range(num_layers) if layer not in set(removed_blocks)]
    record = PruningRecord(
        source_model=loaded.source,
        removed_layers=removed_blocks,
        kept_layers=kept,
        original_num_layers=num_layers,
        method=selection.method,
        selection={**asdict(spec), "iterative": iterative, "order": selection.order},
        scores=selection.steps[0].scores.tolist() if selection.steps else [],
        options={
            "scorer": scorer.options() if scoring else None,
            "data": source.describe() if batches is not None else None,
            "calibration": asdict(calibration) if batches is not None else None,
            "num_tokens": batches.num_tokens if batches is not None else 0,
            "wall_time_s": round(time.perf_counter() - started, 3),
        },
        patch=patch,
        sublayers=sublayers,
    )
    return PruneResult(removed_blocks, kept, record), selection
