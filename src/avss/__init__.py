"""avss: which transformer layers matter, pruning the ones that don't, and hallucination-prone layers.

The public API is small; everything the command line does is reachable from here:

- load a model: :func:`load_model`; calibration text: :class:`TextSource`, :func:`tokenize_texts`
- statistics: :func:`collect_statistics` (streamed, mergeable :class:`ActivationStats`)
- AVSS: :func:`score_layers`; every layer-importance method: :func:`get_scorer`
- pruning: :class:`PruneSpec`, :func:`remove_layers`, :func:`save_pruned`
- evaluation: :func:`evaluate`, :func:`perplexity`
- hallucination-prone layers: :func:`eavss_scores`, :func:`load_pairs`
"""

__version__ = "0.1.0"

from avss.adapters import LayerAdapter, get_adapter, supported_model_types
from avss.collect import StatisticsCollector, collect_statistics
from avss.data import TextSource, tokenize_texts
from avss.evaluation import evaluate, perplexity
from avss.hallucination import eavss_scores, load_pairs
from avss.models import LoadedModel, load_model
from avss.prune import PruneSpec, remove_layers, save_pruned
from avss.scorers import LayerImportance, get_scorer
from avss.scores import LayerScores, score_layers
from avss.stats import ActivationStats, SiteStats

__all__ = [
    "ActivationStats",
    "LayerAdapter",
    "LayerImportance",
    "LayerScores",
    "LoadedModel",
    "PruneSpec",
    "SiteStats",
    "StatisticsCollector",
    "TextSource",
    "__version__",
    "collect_statistics",
    "eavss_scores",
    "evaluate",
    "get_adapter",
    "get_scorer",
    "load_model",
    "load_pairs",
    "perplexity",
    "remove_layers",
    "save_pruned",
    "score_layers",
    "supported_model_types",
    "tokenize_texts",
]
