"""The ``avss`` command line: a thin typer layer over the library.

Each command lives in its own module and registers itself on :data:`app`; commands parse arguments, call one
library function, and print. User errors (:class:`avss.errors.AvssError`) become a one-line message and exit
code 2, with no traceback.
"""

from __future__ import annotations

import sys

from rich.markup import escape

# Importing a command module registers its commands on `app`.
from avss.cli import (
    core,  # noqa: F401  (registration side effect)
    demo_cmd,  # noqa: F401
    evaluate_cmd,  # noqa: F401
    hallucination_cmd,  # noqa: F401
    heal_cmd,  # noqa: F401
    report_cmd,  # noqa: F401
    study_cmd,  # noqa: F401
)
from avss.cli._app import app, console_err
from avss.errors import AvssError


def main() -> None:
    """Run the app in click's standalone mode, which prints usage errors and exits 2 (typer vendors its own
    click, so its exceptions are not ``click``'s); user errors become one unwrapped line and exit 2 here."""
    try:
        app()
    except AvssError as exc:
        console_err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
