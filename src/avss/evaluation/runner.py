"""``evaluate``: run registered tasks on an in-memory model and return a self-describing result.

The model is never saved or reloaded, so a freshly pruned model is evaluated as it sits in memory. Every
result records what produced it (model, task options, data file hashes, package versions, seed, wall time) so
a number in a report can be traced back and reproduced, and one record per example (see
:mod:`avss.evaluation.records`), so its interval and any paired comparison can be recomputed from the file.

Result files: ``avss-eval/2`` adds ``records`` to each task (and ``comparison`` when evaluated with a base);
``avss-eval/1`` files (no records) still load, with empty ``records``. Both start with the
:class:`~avss.provenance.Provenance` keys; files written before ``avss_version`` and ``command`` were
recorded load with them empty.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avss.data import file_sha256, resolve_data_dir
from avss.errors import DataError, UnsupportedArchitectureError
from avss.evaluation import comparison
from avss.evaluation.base import TASKS, DataRecord, Task, data_record, get_task
from avss.evaluation.engine import LanguageModel, Progress, is_causal_lm
from avss.evaluation.harness import run_harness
from avss.evaluation.records import ExampleRecord
from avss.evaluation.uncertainty import BOOTSTRAP, Bootstrap, Inclusion, Interval
from avss.io import atomic_write_json, read_json
from avss.provenance import Provenance

RESULT_FORMAT = "avss-eval/2"
READABLE_FORMATS = ("avss-eval/1", RESULT_FORMAT)


@dataclass
class TaskResult:
    """Metrics of one task, the per-example records they average, and the options and data behind them.

    ``records`` is empty for lm-evaluation-harness tasks and for results read from ``avss-eval/1`` files;
    the interval methods then raise :class:`DataError`.
    """

    metrics: dict[str, float]
    num_examples: int
    config: dict[str, Any]
    data: list[DataRecord]
    seconds: float
    records: list[ExampleRecord] = field(default_factory=list)

    def interval(self, metric: str, bootstrap: Bootstrap = BOOTSTRAP) -> Interval:
        """95% interval of ``metric`` over the examples (perplexity: over documents)."""
        return comparison.interval(self.records, metric, bootstrap)

    def summary(self, bootstrap: Bootstrap = BOOTSTRAP) -> dict[str, Interval]:
        """Every metric's estimate, 95% interval and number of examples."""
        return {metric: self.interval(metric, bootstrap) for metric in self.metrics}

    def baselines(self) -> dict[str, float]:
        """Accuracy of the trivial predictors (majority class, longest answer) on these examples."""
        return comparison.trivial_baselines(self.records)

    def inclusion(self, metric: str, bootstrap: Bootstrap = BOOTSTRAP) -> Inclusion:
        """Whether this (base model's) task belongs in a headline table for ``metric``, and why."""
        return comparison.inclusion(self.records, metric, bootstrap)


@dataclass
class EvalResult:
    """Everything :func:`evaluate` measured; ``to_dict``/``load`` round-trip through JSON.

    ``provenance`` names the evaluated model (``model``) beside the format, time and versions; its keys lead
    the saved file.
    """

    tasks: dict[str, TaskResult]
    options: dict[str, Any]
    wall_time_s: float
    provenance: Provenance
    # With ``avss eval --compare``: the base file and the comparison table (Comparison.to_dict()).
    comparison: dict[str, Any] | None = None

    @property
    def model(self) -> dict[str, Any]:
        return self.provenance.model or {}

    @property
    def versions(self) -> dict[str, str]:
        return self.provenance.versions

    @property
    def created(self) -> str:
        return self.provenance.created

    @property
    def format(self) -> str:
        return self.provenance.format

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: task.metrics for name, task in self.tasks.items()}

    def compare(self, base: EvalResult, bootstrap: Bootstrap = BOOTSTRAP) -> comparison.Comparison:
        """Per task and metric: both results with 95% intervals, the paired difference (this minus
        ``base``), McNemar's test with Holm correction and chance-normalized retention for accuracies, the
        NLL-per-token change for perplexity. Raises :class:`PairingError` when the example sets differ."""
        return comparison.compare(
            {name: (task.metrics, task.records) for name, task in base.tasks.items()},
            {name: (task.metrics, task.records) for name, task in self.tasks.items()},
            bootstrap,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["provenance"]
        for name, task in self.tasks.items():
            out["tasks"][name]["records"] = [record.to_dict() for record in task.records]
        return {**self.provenance.to_dict(), **out}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        path = Path(path)
        try:
            raw = read_json(path)
            if raw.get("format") not in READABLE_FORMATS:
                readable = ", ".join(READABLE_FORMATS)
                raise DataError(f"{path} has format {raw.get('format')!r}; this version reads {readable}")
            tasks = {
                name: TaskResult(
                    **{
                        **task,
                        "data": [data_record(item) for item in task["data"]],
                        "records": [ExampleRecord.from_dict(item) for item in task.get("records", [])],
                    }
                )
                for name, task in raw["tasks"].items()
            }
            return cls(
                tasks=tasks,
                options=raw["options"],
                wall_time_s=raw["wall_time_s"],
                provenance=Provenance.from_dict(raw),
                comparison=raw.get("comparison"),
            )
        except FileNotFoundError as exc:
            raise DataError(f"results file {path} does not exist") from exc
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path} is not an avss eval results file ({exc})") from exc

    def with_comparison(
        self, table: comparison.Comparison, base: EvalResult, base_path: str | Path
    ) -> EvalResult:
        """This result with ``table`` (:meth:`compare` against ``base``, read from ``base_path``) attached,
        as ``avss eval --compare`` saves it: the base file is named with its sha256."""
        source = {"path": str(base_path), "sha256": file_sha256(Path(base_path)), "created": base.created}
        return dataclasses.replace(self, comparison={"base": source, **table.to_dict()})


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
            output = task.run(lm, docs, pool, seed)
            results[name] = TaskResult(
                metrics=output.metrics,
                num_examples=len(docs),
                config=dataclasses.asdict(task),
                data=files,
                seconds=round(time.perf_counter() - task_started, 3),
                records=output.records,
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
        wall_time_s=round(time.perf_counter() - started, 3),
        provenance=Provenance.now(RESULT_FORMAT, model={**describe_model(model), **(model_info or {})}),
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
