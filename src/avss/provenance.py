"""What every output file records about how it was made: package versions and the command line.

A leaf module (standard library only), so any writer can import it without pulling in the statistics pass,
the evaluation engine or the pruning pipeline.
"""

from __future__ import annotations

import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("avss-llm", "torch", "transformers", "numpy", "scikit-learn")


def package_versions() -> dict[str, str]:
    """Python's and the main packages' versions ("not installed" for a missing one)."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def command_line() -> str:
    """The running command as a shell line (``avss score ...`` from the CLI), so a result can be re-run."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
