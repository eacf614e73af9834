"""Layer-importance methods behind one interface, for pruning and for the comparison study.

``get_scorer("block_influence").score(context)`` returns a :class:`LayerImportance` (higher = more important).
Every hook-based method reads the statistics of one shared streaming pass; see :mod:`avss.scorers.context`.
"""

from avss.scorers import activation as _activation  # noqa: F401  (registers the built-in scorers)
from avss.scorers import loss as _loss  # noqa: F401
from avss.scorers import position as _position  # noqa: F401
from avss.scorers.base import (
    SCORERS,
    LayerImportance,
    Scorer,
    available_scorers,
    get_scorer,
    register_scorer,
    split_methods,
)
from avss.scorers.context import CachedContext, ScoringContext, context_for

__all__ = [
    "SCORERS",
    "CachedContext",
    "LayerImportance",
    "Scorer",
    "ScoringContext",
    "available_scorers",
    "context_for",
    "get_scorer",
    "register_scorer",
    "split_methods",
]
