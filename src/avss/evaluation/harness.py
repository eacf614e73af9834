"""Bridge to lm-evaluation-harness (the optional ``harness`` extra) for its own task catalogue.

``run_harness`` wraps an in-memory model in lm-eval's ``HFLM`` so a pruned or mitigated model is scored by the
harness without being saved first. Results come back as :class:`TaskResult` entries named ``harness:TASK`` so
they sit in the same results file, table and ``--compare`` logic as the built-in tasks (see
:func:`avss.evaluation.evaluate`'s ``harness`` argument).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avss.errors import AvssError

PREFIX = "harness:"


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    include_path: str | None = None,
) -> dict[str, tuple[dict[str, float], int]]:
    """Run lm-eval's ``simple_evaluate`` on ``model``; per task, its numeric metrics and sample count."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise AvssError("--harness needs lm-evaluation-harness: pip install 'avss-llm[harness]'") from exc
    device = str(next(model.parameters()).device)
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        output = simple_evaluate(
            model=harness_model,
            tasks=list(tasks),
            limit=limit,
            task_manager=TaskManager(include_path=include_path),
        )
    except (KeyError, ValueError) as exc:
        raise AvssError(f"lm-evaluation-harness could not run {', '.join(tasks)}: {exc}") from exc
    results = {}
    for name, metrics in output["results"].items():
        numeric = {
            key.removesuffix(",none"): float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key
        }
        samples = output.get("n-samples", {}).get(name, {}).get("effective", 0)
        results[PREFIX + name] = (numeric, int(samples))
    return results


# --- the same rows through lm-eval's own task configs -----
#
# The shared data files keep each benchmark's hub rows in a flatter schema (../shared/data/README.md). To run
# lm-eval's YAML for a task on exactly the rows avss scores, each row goes back into the schema the YAML's
# templates read, and a local config includes the built-in one with only the data source replaced.

Row = dict[str, Any]


def _arc_row(row: Row) -> Row:
    choices = {"text": row["choices"], "label": row["labels"]}
    return {
        "id": row["source_id"],
        "question": row["question"],
        "choices": choices,
        "answerKey": row["answer_key"],
    }


def _openbookqa_row(row: Row) -> Row:
    return {
        "id": row["source_id"],
        "question_stem": row["question_stem"],
        "choices": {"text": row["choices"], "label": row["labels"]},
        "answerKey": row["answer_key"],
    }


def _boolq_row(row: Row) -> Row:
    """SuperGLUE's copy, which lm-eval reads: the title leads the passage (../shared/data/README.md)."""
    passage = f"{row['title']} -- {row['passage']}"
    return {"question": row["question"], "passage": passage, "idx": 0, "label": int(row["answer"])}


def sciq_hub_order(row: Row) -> list[int]:
    """Our SciQ option indices in lm-eval's order: the three distractors, then the correct answer."""
    return [i for i in range(len(row["choices"])) if i != row["label"]] + [row["label"]]


def _sciq_row(row: Row) -> Row:
    """The shared file inserted the correct answer at ``label`` among the distractors kept in order, so
    removing it restores them."""
    distractors = [row["choices"][i] for i in sciq_hub_order(row)[:-1]]
    return {
        "question": row["question"],
        **{f"distractor{k}": distractor for k, distractor in enumerate(distractors, 1)},
        "correct_answer": row["choices"][row["label"]],
        "support": row["support"],
    }


def _fields(*names: str) -> Callable[[Row], Row]:
    return lambda row: {name: row[name] for name in names}


@dataclass(frozen=True)
class HarnessTask:
    """Where lm-eval keeps a task's config (under ``lm_eval/tasks``), the split it reads, and our row in the
    schema its templates read."""

    config: str
    split: str
    to_hub: Callable[[Row], Row]


HARNESS_TASKS: dict[str, HarnessTask] = {
    "sciq": HarnessTask("sciq/sciq.yaml", "test", _sciq_row),
    "arc_easy": HarnessTask("arc/arc_easy.yaml", "test", _arc_row),
    "arc_challenge": HarnessTask("arc/arc_challenge.yaml", "test", _arc_row),
    "piqa": HarnessTask("piqa/piqa.yaml", "validation", _fields("goal", "sol1", "sol2", "label")),
    "boolq": HarnessTask("super_glue/boolq/default.yaml", "validation", _boolq_row),
    "winogrande": HarnessTask(
        "winogrande/default.yaml", "validation", _fields("sentence", "option1", "option2", "answer")
    ),
    "openbookqa": HarnessTask("openbookqa/openbookqa.yaml", "test", _openbookqa_row),
    "lambada_openai": HarnessTask("lambada/lambada_openai.yaml", "test", _fields("text")),
}


def write_local_task(directory: Path, task: str, rows: Sequence[Row], name: str | None = None) -> str:
    """lm-eval's own config of our ``task``, renamed (``avss_TASK`` by default) and pointed at ``rows`` (ours,
    written in the hub schema); returns the new task's name. See :func:`write_local_config`."""
    spec = HARNESS_TASKS[task]
    hub_rows = [spec.to_hub(row) for row in rows]
    return write_local_config(directory, spec.config, spec.split, hub_rows, name or f"avss_{task}")


def write_local_config(directory: Path, config: str, split: str, hub_rows: Sequence[Row], name: str) -> str:
    """lm-eval's built-in task config ``config`` (a path under ``lm_eval/tasks``), renamed ``name``, pointed
    at ``hub_rows`` as the local JSON-lines split ``split``.

    The other splits are switched off so nothing is looked for on the hub; prompt, choices, target and
    metrics stay lm-eval's. Run it with ``TaskManager(include_path=directory)`` or ``lm_eval --include_path``.
    """
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / config
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in hub_rows), encoding="utf-8")
    splits = "".join(
        f"{kind}_split: {kind if kind == split else 'null'}\n" for kind in ("training", "validation", "test")
    )
    (directory / f"{name}.yaml").write_text(
        f"include: {builtin}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n" + splits,
        encoding="utf-8",
    )
    return name
