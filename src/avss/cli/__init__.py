"""The ``avss`` command line: a thin typer layer over the library.

Each command lives in its own module and registers itself on :data:`app`; commands parse arguments, call one
library function, and print. User errors (:class:`avss.errors.AvssError`) become a one-line message and exit
code 2, with no traceback.
"""

from __future__ import annotations

import sys

# Importing a command module registers its commands on `app`.
from avss.cli import (
    core,  # noqa: F401  (registration side effect)
    demo_cmd,  # noqa: F401
    evaluate_cmd,  # noqa: F401
)
from avss.cli._app import app, console_err
from avss.errors import AvssError


def main() -> None:
    try:
        app(standalone_mode=False)
    except AvssError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise
