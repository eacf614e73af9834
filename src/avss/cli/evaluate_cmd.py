"""``avss eval``: run evaluation tasks on a model and print (and save) a table of metrics with 95% intervals;
with ``--compare``, the paired comparison against a base result (:meth:`EvalResult.compare`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from avss.cli._app import app, console, console_err
from avss.cli.options import (
    LOADING,
    BenchmarkDir,
    ModelArg,
    OverwriteFile,
    comma_list,
)
from avss.errors import DataError
from avss.evaluation import TASKS, EvalResult, evaluate
from avss.evaluation.comparison import PERPLEXITY, Comparison, ComparisonRow
from avss.evaluation.uncertainty import Interval, PairingError
from avss.io import check_output_file
from avss.models import LoadOptions, load_model

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
DataSource = Annotated[
    str,
    typer.Option(
        help="Task data: auto (the file in the data directory, else the task's Hugging Face dataset), "
        "local or hub"
    ),
]
ResultsOut = Annotated[Path | None, typer.Option(help="Write the results JSON here")]
Compare = Annotated[
    Path | None,
    typer.Option(
        help="Results JSON of a base model on the same examples: paired differences with 95% intervals, "
        "McNemar p (Holm-corrected), chance-normalized retention, NLL change per token"
    ),
]
MaxLength = Annotated[int | None, typer.Option(min=2, help="Perplexity window in tokens (default 1024)")]
Stride = Annotated[int | None, typer.Option(min=1, help="Perplexity window step (default: the window)")]
TextData = Annotated[Path | None, typer.Option(help="Text file for the 'perplexity' task (.txt or .jsonl)")]
EvalSeed = Annotated[int, typer.Option(help="Seed of the --limit sample, few-shot examples, probe splits")]
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
@LOADING.into()
def eval_command(
    model: ModelArg,
    *,
    tasks: Tasks = "",
    harness: Harness = "",
    harness_include: HarnessInclude = None,
    limit: Limit = None,
    batch_size: EvalBatchSize = 16,
    data_dir: BenchmarkDir = None,
    data_source: DataSource = "auto",
    out: ResultsOut = None,
    compare: Compare = None,
    max_length: MaxLength = None,
    stride: Stride = None,
    data: TextData = None,
    num_fewshot: NumFewshot = None,
    loading: LoadOptions,
    seed: EvalSeed = 0,
    overwrite: OverwriteFile = False,
) -> None:
    """Evaluate a model on benchmark tasks: the zero-shot suite (ARC, PIQA, LAMBADA, BoolQ, WinoGrande,
    OpenBookQA, SciQ), perplexity, TruthfulQA, open-domain QA, WikiQA and sentiment."""
    names = list(comma_list(tasks))
    harness_names = list(comma_list(harness))
    if out is not None:
        check_output_file(out, overwrite)
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
    loaded = load_model(model, **asdict(loading))
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
    console.print(results_table(result))
    if base is not None and compare is not None:
        try:
            paired = result.compare(base)
        except PairingError:
            if out is not None:  # minutes of evaluation are not lost to a mismatched base file
                result.save(out)
                console_err.print(f"results (without comparison) written to {out}")
            raise
        for table in comparison_tables(paired):
            console.print(table)
        result = result.with_comparison(paired, base, compare)
    if out is not None:
        result.save(out)
        console.print(f"results written to {out}")


def _interval(value: Interval | float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "-"
    if not isinstance(value, Interval):
        return f"{value:.{digits}f}"
    if math.isnan(value.estimate):
        return "n/a"
    plus = "+" if sign else ""
    return f"{value.estimate:{plus}.{digits}f} [{value.low:{plus}.{digits}f}, {value.high:{plus}.{digits}f}]"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def results_table(result: EvalResult) -> Table:
    """One row per task and metric: the value, its 95% interval over examples (when the task has
    per-example records) and the number of examples."""
    table = Table(title=f"avss eval: {result.model.get('name') or result.model.get('class')}")
    for column in ("task", "metric", "value", "95% interval", "n"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, task in result.tasks.items():
        for metric, value in task.metrics.items():
            bounds = "-"
            with contextlib.suppress(DataError):  # no records, or none this metric can be drawn from
                found = task.interval(metric)
                bounds = f"[{found.low:.4f}, {found.high:.4f}]"
            table.add_row(name, metric, f"{value:.4f}", bounds, str(task.num_examples))
    return table


def comparison_tables(comparison: Comparison) -> list[Table]:
    """Scores and perplexity in separate tables: their differences have different units and are never
    averaged together."""
    scores = Table(title="pruned vs base: paired over the same examples (95% intervals)")
    columns = ("task", "metric", "n", "base", "pruned", "difference", "McNemar p", "Holm p", "chance")
    for column in (*columns, "retention", "headline"):
        scores.add_column(column, justify="left" if column in ("task", "metric", "headline") else "right")
    perplexity = Table(title="perplexity: paired over the same documents (95% intervals)")
    columns = ("task", "docs", "base", "pruned", "NLL/token base", "NLL/token pruned", "change (nats/token)")
    for column in columns:
        perplexity.add_column(column, justify="left" if column == "task" else "right")
    for row in comparison.rows:
        if row.metric == PERPLEXITY:
            perplexity.add_row(*_perplexity_cells(row))
        else:
            scores.add_row(*_score_cells(row))
    return [table for table in (scores, perplexity) if table.row_count]


def _score_cells(row: ComparisonRow) -> list[str]:
    headline = "-" if row.included is None else ("yes" if row.included else f"no: {row.inclusion_reason}")
    return [
        row.task,
        row.metric,
        "-" if row.n is None else str(row.n),
        _interval(row.base),
        _interval(row.new),
        _interval(row.difference, sign=True),
        _p(row.mcnemar.p_value if row.mcnemar else None),
        _p(row.holm_p),
        "-" if row.chance is None else f"{row.chance:.3f}",
        _interval(row.retention, digits=3),
        headline if row.note is None else row.note,
    ]


def _perplexity_cells(row: ComparisonRow) -> list[str]:
    return [
        row.task,
        "-" if row.n is None else str(row.n),
        _interval(row.base, digits=2),
        _interval(row.new, digits=2),
        _interval(row.base_nll_per_token),
        _interval(row.new_nll_per_token),
        _interval(row.difference, sign=True) if row.note is None else row.note,
    ]
