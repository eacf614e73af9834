"""What every output file records about how it was made: its format, when, package versions, the command line.

Every JSON result file avss writes starts with the keys of one :class:`Provenance`: ``format`` (the file's
kind and layout version, ``avss-pruning/2``), ``created``, ``avss_version``, ``command`` and ``versions``, and
``model`` / ``data`` where the file is about one model or one text. Readers (``avss report``, ``avss heal``,
:meth:`avss.evaluation.EvalResult.load`) dispatch on ``format`` instead of guessing a file's kind from its
keys. A file without a ``format`` was written before avss tagged its outputs and counts as version 1 of its
format; each writer bumps its version only when existing keys move or change.

A leaf module (standard library only), so any writer can import it without pulling in the statistics pass,
the evaluation engine or the pruning pipeline.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from avss import __version__  # avss/__init__.py imports its public names lazily, so this loads nothing more

PACKAGES = ("avss-llm", "torch", "transformers", "numpy", "scikit-learn")
FORMAT_TAG = re.compile(r"[a-z][a-z0-9-]*/[0-9]+")  # family/version, e.g. avss-pruning/2


def package_versions() -> dict[str, str]:
    """Python's and the main packages' versions ("not installed" for a missing one)."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


CPUINFO = Path("/proc/cpuinfo")


def processor() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8488C"): bfloat16 results and every
    timing depend on it, so results computed on CPU name it. Linux's /proc/cpuinfo, else ``platform``'s."""
    if CPUINFO.is_file():
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """Where a number was measured, for the benchmarks' records: every timing depends on all of it, bfloat16
    results on the processor and the GPU (None without CUDA). Imports torch only when called, so this module
    stays a leaf."""
    import torch

    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "processor": processor(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory_gib": round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 1) if pages > 0 else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def describe_machine(record: Mapping[str, Any]) -> str:
    """A :func:`machine` record as the line a benchmark's Markdown gives:
    ``AMD EPYC, 2 CPUs, 2 torch threads, 23.4 GiB`` (and ``, GPU NVIDIA H100`` where one was used)."""
    parts = [record["processor"], f"{record['cpus']} CPUs", f"{record['threads']} torch threads"]
    if record.get("memory_gib"):
        parts.append(f"{record['memory_gib']} GiB")
    if record.get("gpu"):
        parts.append(f"GPU {record['gpu']}")
    return ", ".join(parts)


def command_line() -> str:
    """The running command as a shell line (``avss score ...`` from the CLI), so a result can be re-run."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second, the form of every ``created`` field."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance:
    """How one output file was made; its keys lead the file (:meth:`to_dict`).

    ``format`` is required and has the form ``family/version``: readers pick a parser by the family and know
    from the version which layout they read. ``model`` and ``data`` describe the model and the text the file
    is about (``LoadedModel.source``, ``TextSource.describe()``), where it is about one.
    """

    format: str
    created: str
    avss_version: str
    command: str
    versions: dict[str, str]
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """A file without a readable tag could not be dispatched on, so refuse it where it is written."""
        if not isinstance(self.format, str) or not FORMAT_TAG.fullmatch(self.format):
            raise ValueError(f"format must look like 'avss-name/1', got {self.format!r}")

    @classmethod
    def now(
        cls, format: str, *, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None
    ) -> Provenance:
        """The provenance of a file written now by this process."""
        return cls(format, utc_now(), __version__, command_line(), package_versions(), model, data)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Provenance:
        """The provenance keys of a stored file. ``avss_version`` and ``command`` are empty in files written
        before they were recorded (``avss-eval/1`` and early ``avss-eval/2``)."""
        return cls(
            format=raw["format"],
            created=raw.get("created", ""),
            avss_version=raw.get("avss_version", ""),
            command=raw.get("command", ""),
            versions=dict(raw.get("versions", {})),
            model=raw.get("model"),
            data=raw.get("data"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The keys a file starts with; ``model`` and ``data`` only where given."""
        return {key: value for key, value in asdict(self).items() if value is not None}
