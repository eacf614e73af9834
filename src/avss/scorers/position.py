"""Baselines that ignore the activations: a seeded random order and the two position orders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avss.scorers.base import LayerImportance, Scorer, register_scorer
from avss.scorers.context import ScoringContext


@register_scorer("random")
@dataclass
class RandomScorer(Scorer):
    """A seeded random order: what any method must beat to mean something."""

    seed: int = 0
    uses_activations = False

    def score(self, context: ScoringContext) -> LayerImportance:
        generator = torch.Generator().manual_seed(self.seed)
        return self.importance(torch.rand(context.num_layers, generator=generator, dtype=torch.float64))


@register_scorer("last")
@dataclass
class LastScorer(Scorer):
    """Drop the deepest layers first, but never the final block (it feeds the head directly)."""

    uses_activations = False

    def score(self, context: ScoringContext) -> LayerImportance:
        num_layers = context.num_layers
        scores = torch.arange(num_layers, 0, -1, dtype=torch.float64)
        scores[-1] = num_layers + 1
        return self.importance(scores)


@register_scorer("first")
@dataclass
class FirstScorer(Scorer):
    """Drop the shallowest layers first."""

    uses_activations = False

    def score(self, context: ScoringContext) -> LayerImportance:
        return self.importance(torch.arange(context.num_layers, dtype=torch.float64))
