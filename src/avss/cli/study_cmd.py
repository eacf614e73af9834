"""``avss study``: compare layer-importance methods by pruning and evaluating at several budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avss.cli._app import app, console
from avss.cli.options import (
    CALIBRATION_WINDOWS,
    BenchmarkDir,
    Data,
    Dataset,
    Device,
    Dtype,
    ModelArg,
    Threads,
    comma_list,
)
from avss.data import CalibrationOptions, TextSource
from avss.models import DEFAULT_MODEL
from avss.scorers import available_scorers, split_methods
from avss.study import DEFAULT_FRACTIONS, DEFAULT_TASKS, Study, StudyConfig, parse_limits

DEFAULT_METHODS = "avss,variance,sparsity,block_influence,angular,loo_nll,random,last"


@app.command("study")
@CALIBRATION_WINDOWS.into(samples=32)
def study_command(
    model: ModelArg = DEFAULT_MODEL,
    *,
    out: Annotated[
        Path, typer.Option(help="Study folder (an existing study continues with --resume)")
    ] = Path("study"),
    methods: Annotated[
        str,
        typer.Option(
            help=r"Comma-separated methods, options in brackets, e.g. avss\[site=delta]; available: "
            + ", ".join(available_scorers())
        ),
    ] = DEFAULT_METHODS,
    fractions: Annotated[str, typer.Option(help="Comma-separated fractions of layers to remove")] = ",".join(
        f"{f:g}" for f in DEFAULT_FRACTIONS
    ),
    tasks: Annotated[str, typer.Option(help="Comma-separated evaluation tasks")] = ",".join(DEFAULT_TASKS),
    limit: Annotated[
        str | None,
        typer.Option(help="Documents per task: N for all, or task=N,... (e.g. wikitext2=40,sst2=200)"),
    ] = None,
    iterative: Annotated[
        bool, typer.Option("--iterative", help="Also prune iteratively (re-score after each removal)")
    ] = False,
    iterative_methods: Annotated[
        str | None,
        typer.Option(help="Only these methods also prune iteratively (e.g. avss,block_influence)"),
    ] = None,
    repair_methods: Annotated[
        str | None,
        typer.Option(help="Only these methods' cells get the --patch and --heal twins (default: all)"),
    ] = None,
    ppl_max_length: Annotated[
        int | None, typer.Option(help="Window length of perplexity tasks (default: the task's)")
    ] = None,
    eval_batch_size: Annotated[int, typer.Option(min=1, help="Batch size of the evaluation")] = 16,
    heal: Annotated[
        str | None,
        typer.Option(help="Also evaluate every pruned model healed by this method (lora, full, replace)"),
    ] = None,
    heal_steps: Annotated[
        int, typer.Option(min=1, help="Optimizer steps per healed model (same budget for all)")
    ] = 32,
    patch: Annotated[
        bool,
        typer.Option(
            "--patch",
            help="Also evaluate every pruned model repaired by a fitted linear map (--patch linear)",
        ),
    ] = False,
    random_seeds: Annotated[
        int,
        typer.Option(min=1, help="Draws of the random order (seeds 0..N-1), reported as a null band"),
    ] = 1,
    protect: Annotated[
        str | None,
        typer.Option(
            help="Also evaluate every one-shot selection with these blocks kept (e.g. first,last)",
        ),
    ] = None,
    attention_methods: Annotated[
        str | None,
        typer.Option(
            help="Also remove attention sublayers ranked by these methods (e.g. attn_influence,random), as "
            "many as hold each block budget's parameters",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the study in --out: finished cells (and the finished tasks of an interrupted "
            "cell) are kept, a grown study (more methods, "
            "fractions, random draws, protected, iterative or repaired variants, healing where none was) "
            "adds its new cells",
        ),
    ] = False,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Only write results of the cells finished so far")
    ] = False,
    data: Data = None,
    dataset: Dataset = None,
    data_dir: BenchmarkDir = None,
    calibration: CalibrationOptions,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = "auto",
) -> None:
    """Prune MODEL with every method at every fraction, evaluate, and write tables, plots and correlations."""
    task_list = list(comma_list(tasks))
    config = StudyConfig(
        model=model,
        methods=split_methods(methods),
        fractions=[float(f) for f in fractions.split(",") if f.strip()],
        tasks=task_list,
        limits=parse_limits(limit, task_list),
        iterative=iterative,
        iterative_methods=split_methods(iterative_methods) if iterative_methods else [],
        repair_methods=split_methods(repair_methods) if repair_methods else [],
        calibration=calibration,
        calibration_data=TextSource(data=str(data) if data else None, dataset=dataset),
        task_options={"max_length": ppl_max_length} if ppl_max_length else {},
        eval_batch_size=eval_batch_size,
        data_dir=str(data_dir) if data_dir else None,
        seed=calibration.seed,
        heal=heal,
        heal_steps=heal_steps,
        patch=patch,
        random_seeds=random_seeds,
        protect=list(comma_list(protect)) if protect else [],
        dtype=dtype,
        attention_methods=split_methods(attention_methods) if attention_methods else [],
    )
    study = Study(
        config,
        out,
        log=lambda message: console.print(f"[dim]{message}[/]"),
        device=device,
        resume=resume,
        threads=threads,
    )
    result = study.report() if report_only else study.run()
    console.print((out / "summary.md").read_text(encoding="utf-8"), markup=False, highlight=False)
    console.print(f"study written to {out} in {result.wall_time_s:.0f} s")
