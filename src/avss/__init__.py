"""avss: which transformer layers matter, pruning the ones that don't, and hallucination-prone layers.

The public API is small; everything the command line does is reachable from here.
"""

__version__ = "0.1.0"

from avss.adapters import LayerAdapter, get_adapter, supported_model_types
from avss.collect import StatisticsCollector, collect_statistics
from avss.data import TextSource, tokenize_texts
from avss.models import LoadedModel, load_model
from avss.prune import PruneSpec, remove_layers, save_pruned
from avss.scores import LayerScores, score_layers
from avss.stats import ActivationStats, SiteStats

__all__ = [
    "ActivationStats",
    "LayerAdapter",
    "LayerScores",
    "LoadedModel",
    "PruneSpec",
    "SiteStats",
    "StatisticsCollector",
    "TextSource",
    "__version__",
    "collect_statistics",
    "get_adapter",
    "load_model",
    "remove_layers",
    "save_pruned",
    "score_layers",
    "supported_model_types",
    "tokenize_texts",
]
