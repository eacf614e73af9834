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
    ``batches`` limits the losses to the first calibration batches: an iterative selection (SLEB's greedy
    procedure) costs a pass per remaining block at every step, several times the one-shot pass, and a
    smaller stated calibration is what makes it affordable on a CPU.
    """

    batches: int | None = None

    skips_blocks = True

    def __post_init__(self) -> None:
        if self.batches is not None and self.batches < 1:
            raise ValueError(f"batches must be a positive number of calibration batches, not {self.batches}")

    def batches_read(self) -> int | None:
        return self.batches

    def score(self, context: ScoringContext) -> LayerImportance:
        base = context.base_nll(self.batches)
        layers = track(range(context.num_layers), "leave-one-out NLL", enabled=context.progress)
        increase = torch.tensor(
            [context.nll_without(layer, self.batches) - base for layer in layers], dtype=torch.float64
        )
        sequences = sum(len(batch["input_ids"]) for batch in context.batches[: self.batches])
        return self.importance(increase, details={"base_nll": base, "sequences": sequences})
