"""avss: which transformer layers matter, pruning the ones that don't, and hallucination-prone layers.

The public API is small; everything the command line does is reachable from here:

- load a model: :func:`load_model`; calibration text: :class:`TextSource`, :class:`CalibrationOptions`,
  :func:`tokenize_texts`
- the workflow's verbs, in its order: :func:`score` (AVSS scores of ``avss score``), :func:`prune` (any
  method, one-shot or iterative: ``avss prune``), :func:`heal` (``avss heal``), :func:`evaluate`
- statistics: :func:`collect_statistics` (streamed, mergeable :class:`ActivationStats`)
- AVSS: :func:`score_layers`; every layer-importance method: :func:`get_scorer`
- pruning by hand: :class:`PruneSpec`, :func:`remove_layers`, :func:`save_pruned`
- evaluation: :func:`get_task`, :func:`perplexity`
- hallucination-prone layers: :func:`eavss_scores`, :func:`load_pairs`
"""

__version__ = "0.1.0"

# Each public name and the module that defines it. Importing ``avss`` imports none of them: a name is
# imported on first use (PEP 562), so ``import avss.models`` costs only what loading a model needs.
_EXPORTS = {
    "ActivationStats": "avss.stats.accumulators",
    "LayerAdapter": "avss.adapters",
    "LayerImportance": "avss.scorers",
    "LayerScores": "avss.scorers.avss",
    "LoadedModel": "avss.models",
    "CalibrationOptions": "avss.data",
    "PruneSpec": "avss.pruning.rules",
    "SiteStats": "avss.stats.accumulators",
    "StatisticsCollector": "avss.stats.collect",
    "TextSource": "avss.data",
    "collect_statistics": "avss.stats.collect",
    "eavss_scores": "avss.hallucination",
    "evaluate": "avss.evaluation",
    "get_adapter": "avss.adapters",
    "get_scorer": "avss.scorers",
    "get_task": "avss.evaluation",
    "heal": "avss.healing.heal",
    "load_model": "avss.models",
    "load_pairs": "avss.hallucination",
    "perplexity": "avss.evaluation",
    "prune": "avss.pruning.prune",
    "remove_layers": "avss.adapters",
    "save_pruned": "avss.pruning.prune",
    "score": "avss.scorers.run",
    "score_layers": "avss.scorers.avss",
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
    "CalibrationOptions",
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
    "heal",
    "load_model",
    "load_pairs",
    "perplexity",
    "prune",
    "remove_layers",
    "save_pruned",
    "score",
    "score_layers",
    "supported_model_types",
    "tokenize_texts",
]
