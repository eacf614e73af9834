"""Evaluation suite: the papers' benchmarks, offline, batched, and agreeing with lm-evaluation-harness.

``evaluate(model, tokenizer, tasks=[...])`` runs registered tasks on an in-memory model;
``perplexity(...)`` is the plain function the pruning code calls. Tasks live in :mod:`avss.evaluation.tasks`,
metrics (pure functions) in :mod:`avss.evaluation.metrics`, the batched model plumbing in
:mod:`avss.evaluation.engine`.
"""

from avss.evaluation import tasks as _tasks  # noqa: F401  (registers the built-in tasks)
from avss.evaluation.base import TASKS, GenerationTask, MultipleChoiceTask, Task, get_task, register_task
from avss.evaluation.engine import (
    LanguageModel,
    Loglikelihood,
    LoglikelihoodRequest,
    is_causal_lm,
    perplexity,
)
from avss.evaluation.runner import EvalResult, TaskResult, evaluate

__all__ = [
    "TASKS",
    "EvalResult",
    "GenerationTask",
    "LanguageModel",
    "Loglikelihood",
    "LoglikelihoodRequest",
    "MultipleChoiceTask",
    "Task",
    "TaskResult",
    "evaluate",
    "get_task",
    "is_causal_lm",
    "perplexity",
    "register_task",
]
