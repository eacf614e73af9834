"""``avss eval``: run evaluation tasks on a model and print (and save) a table of metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from avss.cli._app import app, console, console_err
from avss.cli.options import AllowPickle, Device, Dtype, ModelArg, TrustRemoteCode, comma_list
from avss.errors import DataError
from avss.evaluation import TASKS, EvalResult, evaluate
from avss.io import ensure_parent_writable
from avss.models import load_model

Tasks = Annotated[str, typer.Option(help=f"Comma-separated tasks: {', '.join(TASKS)}")]
Harness = Annotated[
    str, typer.Option(help="Comma-separated lm-evaluation-harness tasks run on the same in-memory model")
]
HarnessInclude = Annotated[
    Path | None, typer.Option(help="Extra lm-eval task YAML directory (offline tasks)")
]
Limit = Annotated[
    int | None,
    typer.Option(min=1, help="Score a seeded sample of N examples per task (perplexity: first N paragraphs)"),
]
EvalBatchSize = Annotated[int, typer.Option(min=1, help="Sequences per forward pass")]
EvalDataDir = Annotated[
    Path | None, typer.Option(help="Benchmark data laid out like shared/data (default: $AVSS_DATA_DIR)")
]
DataSource = Annotated[
    str,
    typer.Option(
        help="Task data: auto (the file in the data directory, else the task's Hugging Face dataset), "
        "local or hub"
    ),
]
ResultsOut = Annotated[Path | None, typer.Option(help="Write the results JSON here")]
Compare = Annotated[
    Path | None, typer.Option(help="Results JSON of a base model: adds a 'retained' column (pruned / base)")
]
MaxLength = Annotated[int | None, typer.Option(min=2, help="Perplexity window in tokens (default 1024)")]
Stride = Annotated[int | None, typer.Option(min=1, help="Perplexity window step (default: the window)")]
TextData = Annotated[Path | None, typer.Option(help="Text file for the 'perplexity' task (.txt or .jsonl)")]
EvalSeed = Annotated[int, typer.Option(help="Seed for few-shot examples and probe splits")]
NumFewshot = Annotated[int | None, typer.Option(min=0, help="Solved examples in the prompt (QA, sentiment)")]


class _TaskBar:
    """Feeds the engine's work counts into one rich progress bar."""

    def __init__(self, progress: Progress, name: str) -> None:
        self.progress = progress
        self.task_id = progress.add_task(name, total=0)

    def add_total(self, n: int) -> None:
        total = self.progress.tasks[self.task_id].total or 0
        self.progress.update(self.task_id, total=total + n)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task_id, n)


@app.command("eval")
def eval_command(
    model: ModelArg,
    tasks: Tasks = "",
    harness: Harness = "",
    harness_include: HarnessInclude = None,
    limit: Limit = None,
    batch_size: EvalBatchSize = 16,
    data_dir: EvalDataDir = None,
    data_source: DataSource = "auto",
    out: ResultsOut = None,
    compare: Compare = None,
    max_length: MaxLength = None,
    stride: Stride = None,
    data: TextData = None,
    num_fewshot: NumFewshot = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: EvalSeed = 0,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Evaluate a model on benchmark tasks (perplexity, TruthfulQA, SciQ, QA, WikiQA, sentiment)."""
    names = list(comma_list(tasks))
    harness_names = list(comma_list(harness))
    if out is not None:
        ensure_parent_writable(out)
    base = EvalResult.load(compare) if compare is not None else None
    if base is not None and (missing := [name for name in names if name not in base.tasks]):
        raise DataError(f"--compare {compare} has no results for {', '.join(missing)}")
    options: dict[str, Any] = {
        key: value
        for key, value in {
            "max_length": max_length,
            "stride": stride,
            "data": str(data) if data else None,
            "num_fewshot": num_fewshot,
        }.items()
        if value is not None
    }
    loaded = load_model(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console_err) as bars:
        result = evaluate(
            loaded.model,
            loaded.tokenizer,
            names,
            limit=limit,
            batch_size=batch_size,
            data_dir=data_dir,
            data_source=data_source,
            seed=seed,
            model_info=loaded.source,
            progress=lambda name: _TaskBar(bars, name),
            harness=harness_names,
            harness_include=str(harness_include) if harness_include else None,
            **options,
        )
    console.print(results_table(result, base))
    if out is not None:
        result.save(out)
        console.print(f"results written to {out}")


def results_table(result: EvalResult, base: EvalResult | None = None) -> Table:
    """One row per task and metric; with ``base``, its value and the retained fraction as well."""
    table = Table(title=f"avss eval: {result.model.get('name') or result.model.get('class')}")
    for column in ("task", "metric", "value", "n"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    retained = result.retained(base) if base is not None else {}
    if base is not None:
        table.add_column("base", justify="right")
        table.add_column("retained", justify="right")
    for name, task in result.tasks.items():
        for metric, value in task.metrics.items():
            row = [name, metric, f"{value:.4f}", str(task.num_examples)]
            if base is not None:
                base_task = base.tasks.get(name)
                base_value = base_task.metrics.get(metric) if base_task else None
                kept = retained.get(name, {}).get(metric)
                row += [
                    "-" if base_value is None else f"{base_value:.4f}",
                    "-" if kept is None else f"{kept:.1%}",
                ]
            table.add_row(*row)
    return table
