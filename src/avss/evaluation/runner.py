"""``evaluate``: run registered tasks on an in-memory model and return a self-describing result.

The model is never saved or reloaded, so a freshly pruned model is evaluated as it sits in memory. Every
result records what produced it (model, task options, data file hashes, package versions, seed, wall time) so
a number in a report can be traced back and reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avss.data import resolve_data_dir
from avss.errors import DataError, UnsupportedArchitectureError
from avss.evaluation.base import TASKS, DataRecord, Task, data_record, get_task
from avss.evaluation.engine import LanguageModel, Progress, is_causal_lm
from avss.evaluation.harness import run_harness
from avss.evaluation.metrics import retained
from avss.io import atomic_write_json

RESULT_FORMAT = "avss-eval/1"
_PACKAGES = ("avss-llm", "torch", "transformers", "numpy", "scikit-learn")


@dataclass
class TaskResult:
    """Metrics of one task, with the options and data that produced them."""

    metrics: dict[str, float]
    num_examples: int
    config: dict[str, Any]
    data: list[DataRecord]
    seconds: float


@dataclass
class EvalResult:
    """Everything :func:`evaluate` measured; ``to_dict``/``load`` round-trip through JSON."""

    model: dict[str, Any]
    tasks: dict[str, TaskResult]
    options: dict[str, Any]
    versions: dict[str, str]
    wall_time_s: float
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: str = RESULT_FORMAT

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: task.metrics for name, task in self.tasks.items()}

    def retained(self, base: EvalResult) -> dict[str, dict[str, float]]:
        """Fraction of ``base``'s score kept by this result, per task and metric (perplexity inverted)."""
        return retained(base.metrics, self.metrics)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            tasks = {
                name: TaskResult(**{**task, "data": [data_record(item) for item in task["data"]]})
                for name, task in raw.pop("tasks").items()
            }
            return cls(tasks=tasks, **raw)
        except FileNotFoundError as exc:
            raise DataError(f"results file {path} does not exist") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is not an avss eval results file ({exc})") from exc


def build_tasks(names: Sequence[str], options: Mapping[str, Any]) -> dict[str, Task]:
    """Instantiate tasks, giving each the options it declares; an option no task declares is an error."""
    classes = {name: get_task(name) for name in dict.fromkeys(names)}
    if not classes:
        raise DataError("no tasks given")
    accepted = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in classes.items()}
    unused = set(options) - set().union(*accepted.values())
    if unused:
        raise DataError(f"option(s) {', '.join(sorted(unused))} not used by task(s) {', '.join(classes)}")
    return {
        name: cls(**{key: value for key, value in options.items() if key in accepted[name]})
        for name, cls in classes.items()
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    data_dir: str | Path | None = None,
    data_source: str = "auto",
    seed: int = 0,
    model_info: Mapping[str, Any] | None = None,
    progress: Callable[[str], Progress] | None = None,
    harness: Sequence[str] = (),
    harness_include: str | None = None,
    **task_options: Any,
) -> EvalResult:
    """Evaluate ``model`` on the named tasks; ``limit`` scores a seeded sample of N documents of each
    (the first N paragraphs for perplexity tasks).

    ``task_options`` go to every task that declares them (``max_length``/``stride`` for perplexity tasks,
    ``num_fewshot``, ``split``, ``method``, ...). ``progress(task_name)`` may return a per-task progress sink.
    ``harness`` names lm-evaluation-harness tasks to run on the same model (results named ``harness:TASK``;
    ``harness_include`` adds a directory of task YAMLs, e.g. for offline data). ``data_source`` is ``auto``
    (each task's file in the data directory, else its Hugging Face dataset), ``local`` or ``hub``; every task
    result records the file hashes or the hub dataset, revision and fingerprint it read.
    """
    if limit is not None and limit < 1:
        raise DataError("--limit must be a positive number of examples")
    if not tasks and not harness:
        raise DataError("no tasks given")
    instances = build_tasks(tasks, task_options) if tasks else {}
    directory = resolve_data_dir(data_dir)
    if not is_causal_lm(model):
        needing_head = [name for name, task in instances.items() if task.needs_causal_lm]
        if needing_head:
            encoder_tasks = sorted(name for name, cls in TASKS.items() if not cls.needs_causal_lm)
            raise UnsupportedArchitectureError(
                f"task(s) {', '.join(needing_head)} need a causal language model, but {type(model).__name__} "
                f"has no LM head; encoder models support {', '.join(encoder_tasks)}"
            )
    # Load every task's data before spending minutes on the model, so a missing file fails at once.
    loaded = {name: task.load(directory, data_source) for name, task in instances.items()}

    was_training = model.training
    model.eval()
    started = time.perf_counter()
    results = {}
    try:
        for name, task in instances.items():
            _seed_everything(seed)
            pool, files = loaded[name]
            docs = task.select(pool, limit, seed)
            lm = LanguageModel(
                model, tokenizer, batch_size=batch_size, progress=progress(name) if progress else None
            )
            task_started = time.perf_counter()
            metrics = task.run(lm, docs, pool, seed)
            results[name] = TaskResult(
                metrics=metrics,
                num_examples=len(docs),
                config=dataclasses.asdict(task),
                data=files,
                seconds=round(time.perf_counter() - task_started, 3),
            )
        if harness:
            harness_started = time.perf_counter()
            outcome = run_harness(
                model, tokenizer, harness, limit=limit, batch_size=batch_size, include_path=harness_include
            )
            seconds = round(time.perf_counter() - harness_started, 3)
            for name, (metrics, count) in outcome.items():
                results[name] = TaskResult(metrics, count, {"harness": True}, [], seconds)
    finally:
        model.train(was_training)
    return EvalResult(
        model={**describe_model(model), **(model_info or {})},
        tasks=results,
        options={
            "tasks": list(instances),
            "harness": list(harness),
            "limit": limit,
            "batch_size": batch_size,
            "seed": seed,
            "data_dir": str(directory) if directory else None,
            "data_source": data_source,
            **task_options,
        },
        versions=package_versions(),
        wall_time_s=round(time.perf_counter() - started, 3),
    )


def describe_model(model: Any) -> dict[str, Any]:
    config = model.config
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "name_or_path", None) or None,
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
