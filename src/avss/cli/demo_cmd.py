"""``avss demo``: the main job of ``make demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avss.cli._app import app, console
from avss.cli.core import print_warnings, scores_table
from avss.cli.options import DataDir, Device, Dtype, ModelArg, Overwrite
from avss.demo import DemoOptions, run_demo
from avss.models import DEFAULT_MODEL


@app.command()
def demo(
    model: ModelArg = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Run directory")] = Path("results/demo"),
    fraction: Annotated[float, typer.Option(help="Share of layers to remove")] = 0.25,
    samples: Annotated[int, typer.Option(min=1, help="Calibration sequences")] = 64,
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Score every layer, prune the lowest 25% by AVSS, save, reload, and compare perplexity."""
    options = DemoOptions(
        model=model,
        fraction=fraction,
        samples=samples,
        device=device,
        dtype=dtype,
        data_dir=str(data_dir) if data_dir else None,
    )
    result, run = run_demo(out, options, overwrite=overwrite)
    console.print(scores_table(run, result.removed_layers))
    print_warnings(run.scores.warnings())
    console.print(f"[bold]{result.summary_line()}[/]")
    difference = result.max_logit_difference_after_reload
    console.print(f"reloaded model matches in-memory logits (max |diff| = {difference:.2e})")
    console.print(
        f"outputs in {out}: model/, scores.json, scores.png, summary.json ({result.wall_time_s:.0f} s)"
    )
