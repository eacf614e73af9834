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

# Each public name and the module that defines it. Importing ``avss`` imports none of them: a name is
# imported on first use (PEP 562), so ``import avss.models`` costs only what loading a model needs.
_EXPORTS = {
    "ActivationStats": "avss.stats",
    "LayerAdapter": "avss.adapters",
    "LayerImportance": "avss.scorers",
    "LayerScores": "avss.scores",
    "LoadedModel": "avss.models",
    "PruneSpec": "avss.prune",
    "SiteStats": "avss.stats",
    "StatisticsCollector": "avss.collect",
    "TextSource": "avss.data",
    "collect_statistics": "avss.collect",
    "eavss_scores": "avss.hallucination",
    "evaluate": "avss.evaluation",
    "get_adapter": "avss.adapters",
    "get_scorer": "avss.scorers",
    "get_task": "avss.evaluation",
    "load_model": "avss.models",
    "load_pairs": "avss.hallucination",
    "perplexity": "avss.evaluation",
    "remove_layers": "avss.prune",
    "save_pruned": "avss.prune",
    "score_layers": "avss.scores",
    "supported_model_types": "avss.adapters",
    "tokenize_texts": "avss.data",
}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'avss' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [  # resolved lazily by __getattr__
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
    "get_task",
    "load_model",
    "load_pairs",
    "perplexity",
    "remove_layers",
    "save_pruned",
    "score_layers",
    "supported_model_types",
    "tokenize_texts",
]
