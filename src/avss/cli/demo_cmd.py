"""``avss demo``: the main job of ``make demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avss.cli._app import app, console
from avss.cli.options import BenchmarkDir, Device, Dtype, ModelArg, Overwrite, Threads
from avss.demo import SAVED, DemoOptions, run_demo
from avss.models import DEFAULT_MODEL


@app.command()
def demo(
    model: ModelArg = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Run directory")] = Path("results/demo"),
    fraction: Annotated[float, typer.Option(help="Share of layers to remove")] = 0.25,
    samples: Annotated[int, typer.Option(min=1, help="Calibration sequences")] = 64,
    data_dir: BenchmarkDir = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Remove 25% of the blocks three ways (AVSS, block influence, block influence + linear patch), compare
    each with the unpruned model on the same examples, and save and reload the patched model."""
    options = DemoOptions(
        model=model,
        fraction=fraction,
        samples=samples,
        device=device,
        dtype=dtype,
        data_dir=str(data_dir) if data_dir else None,
        threads=threads,
    )
    result = run_demo(out, options, overwrite=overwrite)
    console.print(f"[bold]{options.model}: {result.num_layers_before} blocks, removing {fraction:.0%}[/]")
    for line in result.lines():
        console.print(line, markup=False, highlight=False)
    difference = result.max_logit_difference_after_reload
    console.print(f"reloaded {SAVED} model matches in-memory logits (max |diff| = {difference:.2e})")
    console.print(f"outputs in {out}: model/, summary.json, summary.txt ({result.wall_time_s:.0f} s)")
