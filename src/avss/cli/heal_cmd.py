"""``avss heal``: recover what pruning took with LoRA, one replacement block per span, or fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avss.cli._app import app, console
from avss.cli.core import print_warnings
from avss.cli.options import (
    CALIBRATION_TEXT,
    LOADING,
    Autocast,
    BatchSize,
    Out,
    Overwrite,
    comma_list,
)
from avss.data import TextSource
from avss.healing.heal import HealConfig, HealResult, heal
from avss.healing.methods import HEAL_METHODS
from avss.models import LoadOptions

Method = Annotated[str, typer.Option(help=f"Healing method: {', '.join(HEAL_METHODS)}")]
Steps = Annotated[int, typer.Option(min=1, help="Optimizer steps in all (split over --epochs)")]
WindowLength = Annotated[int, typer.Option(min=2, help="Tokens per training window")]
TrainSeed = Annotated[int, typer.Option(help="Seed for the training windows and the run")]


def heal_summary(result: HealResult) -> str:
    """One line with the validation loss before and after, time and memory."""
    training = result.record.training
    losses = training["val_loss"]
    best = training["best_epoch"] or 0
    return (
        f"{result.record.method}: validation loss {losses[0]:.4f} -> {losses[best]:.4f} "
        f"(best epoch {best}, {training['steps']} steps, {result.record.trainable_parameters:,} trained "
        f"parameters, {training['wall_time_s']:.0f} s, peak memory "
        f"{training['peak_memory_bytes'] / 2**20:.0f} MiB ({training['peak_memory_kind']}))"
    )


@app.command("heal")
@CALIBRATION_TEXT.into()
@LOADING.into()
def heal_command(
    pruned_dir: Annotated[Path, typer.Argument(help="A directory written by `avss prune`")],
    *,
    out: Out = Path("healed"),
    method: Method = "lora",
    steps: Steps = 200,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training windows")] = 2,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the method's)")] = None,
    patience: Annotated[
        int | None, typer.Option(help="Epochs without validation improvement before stopping")
    ] = 1,
    validation_samples: Annotated[int, typer.Option(min=1, help="Windows held out for validation")] = 16,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha")] = 16.0,
    target_modules: Annotated[
        str | None,
        typer.Option(help="Comma-separated LoRA targets, or all-linear (default: peft's table)"),
    ] = None,
    neighbours: Annotated[
        int, typer.Option(min=1, help="Kept blocks trained on each side of a removed span (lora, full)")
    ] = 1,
    merge: Annotated[
        bool, typer.Option("--merge/--no-merge", help="Merge LoRA into a plain model or save the adapter")
    ] = True,
    teacher: Annotated[
        str | None,
        typer.Option(help="Original model for --method replace (default: the pruning record's)"),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.checkpoint")] = False,
    autocast: Autocast = "auto",
    source: TextSource,
    max_length: WindowLength = 128,
    batch_size: BatchSize = 4,
    seed: TrainSeed = 0,
    overwrite: Overwrite = False,
    loading: LoadOptions,
) -> None:
    """Heal the pruned model in PRUNED_DIR on training text and save it to OUT with provenance."""
    config = HealConfig(
        method=method,
        steps=steps,
        epochs=epochs,
        learning_rate=lr,
        patience=patience,
        validation_samples=validation_samples,
        rank=rank,
        alpha=alpha,
        target_modules=comma_list(target_modules or "") or None,
        neighbours=neighbours,
        merge=merge,
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
        resume=resume,
        autocast=autocast,
    )
    result = heal(
        pruned_dir,
        out,
        config,
        source,
        teacher=teacher,
        loading=loading,
        overwrite=overwrite,
    )
    print_warnings(result.record.training["warnings"])
    console.print(heal_summary(result))
    saved = "model" if result.record.merged else f"LoRA adapter for {pruned_dir}"
    console.print(f"healed {saved} saved to {out}")
