"""Hugging Face hub copies of the benchmarks: which dataset each task names and how its rows are read.

The data directory is the first source of every task (offline, hashed, the normalized schemas of
``shared/data/README.md``). When a task's file is missing there, the same benchmark can be read by name
with ``datasets.load_dataset`` (the optional ``avss-llm[datasets]`` extra). Each task declares a
:class:`HubSource`: the dataset id, its config, the hub split behind each task split, and a pure converter
from the hub's own column schema to the normalized documents the task already consumes, so a task's scoring
code never knows where its documents came from.

Nothing here reaches the network when ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` is set, or when
``datasets`` is not installed: the load is not attempted and the reason is reported instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from avss.errors import DataError, HubUnavailableError

Row = Mapping[str, Any]
Doc = dict[str, Any]
# A hub row and its reference ("SPLIT_NNNN": the task split and the row's 0-based index) -> one document.
RowConverter = Callable[[Row, str], Doc]
# All rows of a hub split and the task split -> the documents (for sources whose documents span rows).
SplitConverter = Callable[[Sequence[Row], str], list[Doc]]

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub and datasets read as "set"
# datasets records each downloaded file as hf://datasets/ID@COMMIT/PATH; the commit is the revision read.
_COMMIT = re.compile(r"^hf://datasets/[^@]+@([0-9a-f]{40})/")


@dataclass(frozen=True)
class HubData:
    """A hub dataset split a task read, recorded in results beside (or instead of) local file hashes.

    ``revision`` is the dataset repository commit that ``datasets`` downloaded (None when it does not report
    one), and ``fingerprint`` is datasets' hash of the loaded split, which changes with its content.
    """

    dataset: str
    config: str | None
    split: str
    revision: str | None
    fingerprint: str | None
    source: str = "hub"

    @property
    def spec(self) -> str:
        return hub_spec(self.dataset, self.config, self.split)

    @property
    def digest(self) -> str | None:
        return self.fingerprint


def hub_spec(dataset: str, config: str | None, split: str) -> str:
    """``ID[:CONFIG]@SPLIT``, the same notation as ``--dataset``."""
    return f"{dataset}{':' + config if config else ''}@{split}"


def per_row(convert: RowConverter) -> SplitConverter:
    """A split converter that converts each row on its own (every source but WikiQA's sentence rows)."""

    def convert_split(rows: Sequence[Row], split: str) -> list[Doc]:
        return [convert(row, f"{split}_{index:04d}") for index, row in enumerate(rows)]

    return convert_split


@dataclass(frozen=True)
class HubSource:
    """Where a task's benchmark lives on the hub; ``splits`` maps each task split to the hub split."""

    dataset: str
    config: str | None
    splits: Mapping[str, str]
    convert: SplitConverter

    def spec(self, split: str) -> str:
        return hub_spec(self.dataset, self.config, self.splits[split])

    def load(self, split: str) -> tuple[list[Doc], HubData]:
        """The normalized documents of task split ``split`` and their provenance, or a
        :class:`HubUnavailableError` that says why the hub was not read."""
        offline = offline_reason()
        if offline:
            raise HubUnavailableError(f"{offline}, so the hub was not contacted (unset it to download)")
        try:
            import datasets
        except ImportError as exc:
            raise HubUnavailableError(
                "the `datasets` package is not installed (pip install 'avss-llm[datasets]')"
            ) from exc
        hub_split = self.splits[split]
        try:
            dataset = datasets.load_dataset(self.dataset, self.config, split=hub_split)
        except Exception as exc:  # network, missing repo, bad config: all mean "not readable from the hub"
            raise HubUnavailableError(f"load_dataset failed: {type(exc).__name__}: {exc}") from exc
        rows = list(dataset)
        try:
            documents = self.convert(rows, split)
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"hub dataset {self.spec(split)} does not have the columns avss reads ({exc!r}); "
                f"its columns are {dataset.column_names}"
            ) from exc
        record = HubData(
            self.dataset,
            self.config,
            hub_split,
            _revision(dataset),
            getattr(dataset, "_fingerprint", None),
        )
        return documents, record


def offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1 is set"`` when an offline switch is on, else None."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "")
        if value.upper() in _TRUE:
            return f"{name}={value} is set"
    return None


def _revision(dataset: Any) -> str | None:
    checksums = getattr(getattr(dataset, "info", None), "download_checksums", None) or {}
    for url in checksums:
        match = _COMMIT.match(str(url))
        if match:
            return match.group(1)
    return None
