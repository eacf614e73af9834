"""``avss report``: one self-contained HTML page (and Markdown) summarizing run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avss.cli._app import app, console
from avss.cli.options import OverwriteFile
from avss.io import check_output_file
from avss.report import write_report


@app.command("report")
def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by avss commands")],
    out: Annotated[Path, typer.Option(help="HTML page to write")] = Path("report.html"),
    markdown: Annotated[
        Path | None, typer.Option(help="Markdown version (default: --out with the suffix .md)")
    ] = None,
    title: Annotated[str, typer.Option(help="Page title")] = "avss report",
    overwrite: OverwriteFile = False,
) -> None:
    """Summarize scores, pruned layers, evaluations, study tables and plots of RUN_DIRS in one page."""
    markdown = markdown or out.with_suffix(".md")
    for path in (out, markdown):
        check_output_file(path, overwrite)
    html_path, markdown_path = write_report(run_dirs, out, markdown, title)
    console.print(f"report written to {html_path} and {markdown_path}")
