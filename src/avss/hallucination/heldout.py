"""Evaluate a model on held-out questions only: the test split of :func:`avss.hallucination.pairs.split_of`,
or of any other :data:`~avss.hallucination.pairs.Splitter` (a cross-validation fold, a leakage-free subset).

Training pairs come from the train split of the same files, so the registered evaluation tasks are run here on
the documents whose question falls in the requested split (tasks without questions, such as WikiText-2
perplexity, keep their first ``limit`` documents). The task code, prompts and metrics are those of
:mod:`avss.evaluation`; only the document list differs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avss.data import resolve_data_dir
from avss.evaluation import LanguageModel, get_task
from avss.evaluation.runner import build_tasks
from avss.hallucination.pairs import Splitter, split_of


def heldout_docs(
    docs: list[dict[str, Any]], split: str, limit: int | None, splitter: Splitter = split_of
) -> list[dict[str, Any]]:
    if docs and "question" in docs[0]:
        docs = [doc for doc in docs if splitter(doc["question"]) == split]
    return docs[:limit]


def evaluate_heldout(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    split: str = "test",
    limits: dict[str, int | None] | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    seed: int = 0,
    splitter: Splitter = split_of,
    **task_options: Any,
) -> dict[str, Any]:
    """``{"metrics": {task: {...}}, "num_examples": {...}, "records": {task: [...]}, ...}`` on the questions
    of each task that ``splitter`` puts in ``split``. ``records`` are the per-example
    :class:`~avss.evaluation.records.ExampleRecord` dicts: pooled over cross-validation folds they give one
    interval for all test questions, and before/after pairs compare per question."""
    for name in tasks:
        get_task(name)  # unknown names fail before any work
    instances = build_tasks(tasks, task_options)
    directory = resolve_data_dir(data_dir)
    limits = limits or {}
    started = time.perf_counter()
    metrics, counts, files, seconds, records = {}, {}, {}, {}, {}
    was_training = model.training
    model.eval()
    try:
        for name, task in instances.items():
            pool, data_files = task.load(directory)
            docs = heldout_docs(pool, split, limits.get(name), splitter)
            lm = LanguageModel(model, tokenizer, batch_size=batch_size)
            task_started = time.perf_counter()
            output = task.run(lm, docs, pool, seed)
            metrics[name] = output.metrics
            records[name] = [record.to_dict() for record in output.records]
            counts[name] = len(docs)
            files[name] = [f.digest for f in data_files]
            seconds[name] = round(time.perf_counter() - task_started, 3)
    finally:
        model.train(was_training)
    return {
        "metrics": metrics,
        "num_examples": counts,
        "records": records,
        "split": split,
        "limits": limits,
        "data_sha256": files,
        "seconds": seconds,
        "options": task_options,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
