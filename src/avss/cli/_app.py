"""The shared typer application and consoles, imported by every command module."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="avss",
    help="Layer importance (AVSS), depth pruning and hallucination-prone layers (EAVSS) for transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
console_err = Console(stderr=True)
