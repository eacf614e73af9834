"""``avss hallucination`` (EAVSS per layer) and ``avss mitigate`` (contrastive training of chosen layers)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from avss.cli._app import app, console
from avss.cli.core import print_warnings
from avss.cli.options import (
    LOADING,
    Autocast,
    BenchmarkDir,
    FlagGroup,
    ModelArg,
    Overwrite,
    Site,
    Threshold,
    Variance,
    comma_list,
)
from avss.hallucination.mitigate import MitigationOptions
from avss.hallucination.scoring import EavssOptions
from avss.hallucination.workflow import (
    MitigationPlan,
    PairSpec,
    comparison_rows,
    hallucination_scores,
    mitigation_run,
)
from avss.io import check_output_dir
from avss.models import DEFAULT_MODEL, LoadOptions, load_model
from avss.training import TrainConfig

Pairs = Annotated[
    str, typer.Option(help="Pair sources: truthfulqa, sciq, wikiqa, nq, triviaqa (comma-separated)")
]
Limit = Annotated[int | None, typer.Option(min=1, help="At most this many train-split questions per source")]
Combine = Annotated[str, typer.Option(help="ratio (H/T) or diff (|H-T|)")]
MaxLength = Annotated[int, typer.Option(min=8, help="Tokens per prompt + answer")]
FoldCount = Annotated[
    int | None,
    typer.Option(
        "--folds",
        min=2,
        help="Split questions into this many cross-validation folds instead of train/val/test",
    ),
]
FoldIndex = Annotated[int, typer.Option(min=0, help="With --folds: the test fold (the others train)")]


def pair_spec(pairs: str, data_dir: Path | None, limit: int | None, folds: int | None, fold: int) -> PairSpec:
    return PairSpec(comma_list(pairs), str(data_dir) if data_dir else None, limit, folds=folds, fold=fold)


PAIR_FLAGS = FlagGroup(
    "pairs",
    (
        ("pairs", Pairs, "truthfulqa"),
        ("data_dir", BenchmarkDir, None),
        ("limit", Limit, None),
        ("folds", FoldCount, None),
        ("fold", FoldIndex, 0),
    ),
    pair_spec,
)
"""Which truthful/hallucinated pairs, and how their questions split -> :class:`PairSpec`."""


@app.command("hallucination")
@PAIR_FLAGS.into()
@LOADING.into()
def hallucination_command(
    model: ModelArg = DEFAULT_MODEL,
    *,
    out: Annotated[Path, typer.Option(help="Directory for eavss.json and eavss.png")] = Path("eavss"),
    pairs: PairSpec,
    combine: Combine = "ratio",
    site: Site = "block",
    variance: Variance = "elements",
    threshold: Threshold = "rel:0.01",
    max_length: MaxLength = 128,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    overwrite: Overwrite = False,
    loading: LoadOptions,
) -> None:
    """Score every layer of MODEL by EAVSS on truthful vs hallucinated answers (train-split questions)."""
    check_output_dir(out, overwrite)
    options = EavssOptions(site, variance, threshold, combine, max_length, batch_size)
    loaded = load_model(model, **asdict(loading))
    run = hallucination_scores(loaded, pairs, options, out)
    table = Table(title=f"EAVSS per layer ({combine}, site={site}, threshold={threshold})")
    for column in ("layer", "HSAV~", "HSS~", "EAVSS~", "AVSS~", "rank"):
        table.add_column(column, justify="right")
    for row in run.to_dict()["layers"]:
        table.add_row(
            str(row["layer"]),
            *(
                f"{row[key]:.4f}"
                for key in ("hsav_normalized", "hss_normalized", "eavss_normalized", "avss_normalized")
            ),
            str(row["rank"]),
        )
    console.print(table)
    console.print(f"most hallucination-prone layers: {run.scores.ranking()[:8]}; written to {out}")


@app.command("mitigate")
@PAIR_FLAGS.into()
@LOADING.into()
def mitigate_command(
    model: ModelArg = DEFAULT_MODEL,
    *,
    out: Annotated[Path, typer.Option(help="Directory for the mitigated model")] = Path("mitigated"),
    layers: Annotated[
        str, typer.Option(help="auto (top-k EAVSS), lowest, random, all, or a list like 3,7,12")
    ] = "auto",
    k: Annotated[int, typer.Option(min=1, help="Number of layers to train")] = 4,
    pairs: PairSpec,
    val_limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many validation questions")
    ] = None,
    drop_refusals: Annotated[
        bool,
        typer.Option(
            "--drop-refusals", help='Train without pairs whose truthful answer is "I have no comment"'
        ),
    ] = False,
    contrast: Annotated[str, typer.Option(help="infonce or logprob")] = "infonce",
    logprob_reduction: Annotated[
        str,
        typer.Option(
            help="logprob contrast: sum (sequence log-likelihood, as MC scores) or mean (per token)"
        ),
    ] = "sum",
    tau: Annotated[float, typer.Option(min=1e-4, help="InfoNCE temperature")] = 0.1,
    lam: Annotated[float, typer.Option("--lambda", min=0.0, help="Weight of the contrastive loss")] = 0.5,
    lora: Annotated[
        bool, typer.Option("--lora", help="Train LoRA adapters on the layers, merged on save")
    ] = False,
    lora_rank: Annotated[int, typer.Option(min=1)] = 8,
    negatives: Annotated[int, typer.Option(min=1, help="Hallucinated answers per question")] = 2,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimizer step")] = 1,
    questions_per_batch: Annotated[int, typer.Option(min=1)] = 4,
    patience: Annotated[
        int, typer.Option(min=1, help="Epochs without validation improvement before stopping")
    ] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Score/train rounds while validation improves")] = 1,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last epoch checkpoint in OUT.checkpoint")
    ] = False,
    evaluate: Annotated[
        bool, typer.Option("--eval", help="Before/after table on test-split questions")
    ] = False,
    eval_tasks: Annotated[str, typer.Option(help="Tasks for --eval")] = "truthfulqa_mc,sciq,wikitext2",
    eval_limit: Annotated[int | None, typer.Option(min=1, help="Test questions (or lines) per task")] = 100,
    combine: Combine = "ratio",
    site: Site = "block",
    threshold: Threshold = "rel:0.01",
    max_length: MaxLength = 128,
    seed: Annotated[int, typer.Option(help="Seed for training and for --layers random")] = 0,
    autocast: Autocast = "auto",
    overwrite: Overwrite = False,
    loading: LoadOptions,
) -> None:
    """Train only the chosen layers of MODEL with LM loss + lambda x contrastive loss, then save it."""
    check_output_dir(out, overwrite)
    train_config = TrainConfig(
        epochs=epochs,
        lr=lr,
        grad_accum=grad_accum,
        patience=patience,
        seed=seed,
        resume=resume,
        autocast=autocast,
    )
    options = MitigationOptions(
        contrast=contrast,
        logprob_reduction=logprob_reduction,
        tau=tau,
        lam=lam,
        lora=lora,
        lora_rank=lora_rank,
        negatives=negatives,
        max_length=max_length,
        questions_per_batch=questions_per_batch,
        train=train_config,
    )
    tasks = comma_list(eval_tasks) if evaluate else ()
    plan = MitigationPlan(
        layers=layers,
        k=k,
        rounds=rounds,
        seed=seed,
        eval_tasks=tasks,
        eval_limits=dict.fromkeys(tasks, eval_limit),
    )
    spec = replace(pairs, val_limit=val_limit, drop_refusals=drop_refusals)
    eavss = EavssOptions(site=site, threshold=threshold, combine=combine, max_length=max_length)
    loaded = load_model(model, **asdict(loading))
    record = mitigation_run(loaded, spec, plan, options, eavss, out, overwrite)
    trained = [round_["layers"] for round_ in record["rounds"]]
    trainings = [round_["mitigation"]["training"] for round_ in record["rounds"]]
    print_warnings(sorted({warning for training in trainings for warning in training.get("warnings", [])}))
    console.print(f"trained layers per round: {trained}; saved to {out}")
    table = Table(title="Before / after on test-split questions")
    for column in ("task", "metric", "before", "after", "change"):
        table.add_column(column, justify="right")
    for task, metric, before, after in comparison_rows(record):
        table.add_row(task, metric, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    console.print(table)
