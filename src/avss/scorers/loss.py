"""Leave-one-out loss (SLEB-style): how much the calibration NLL rises when a block is skipped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avss.progress import track
from avss.scorers.base import LayerImportance, Scorer, register_scorer
from avss.scorers.context import ScoringContext


@register_scorer("loo_nll")
@dataclass
class LeaveOneOutScorer(Scorer):
    """``score_l = NLL(model without block l) - NLL(model)`` on the calibration tokens; small = removable.

    With a :class:`~avss.scorers.context.CachedContext` skipping block ``l`` runs only the blocks after it.
    """

    skips_blocks = True

    def score(self, context: ScoringContext) -> LayerImportance:
        base = context.base_nll()
        layers = track(range(context.num_layers), "leave-one-out NLL", enabled=context.progress)
        increase = torch.tensor([context.nll_without(layer) - base for layer in layers], dtype=torch.float64)
        return self.importance(increase, details={"base_nll": base})
