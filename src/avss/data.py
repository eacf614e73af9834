"""Where text comes from: the bundled corpus, user files, the shared data directory, or a hub dataset.

Calibration text is a list of strings; :func:`tokenize_texts` turns it into padded batches with
attention masks.
Nothing here downloads anything unless the user names a hub dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from avss.errors import DataError, OptionError

DATA_DIR_ENV = "AVSS_DATA_DIR"
BUNDLED_CORPORA = ("calibration", "evaluation")


def default_data_dir() -> Path | None:
    """The data directory from ``$AVSS_DATA_DIR``, else ``../shared/data`` beside the project when present."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """Return the explicit ``data_dir`` (which must exist) or the default one (which may be absent)."""
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"--data-dir {path} is not a directory")
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file; a binary or otherwise undecodable file is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 text (invalid byte at offset {exc.start}); "
            "pass a .txt or .jsonl file"
        ) from exc


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line is reported with the file and line number."""
    path = Path(path)
    rows = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"data file {path} is empty")
    return rows


def bundled_text(name: str = "calibration") -> str:
    """Original prose shipped with the package: ``calibration`` for scoring, ``evaluation`` held apart."""
    if name not in BUNDLED_CORPORA:
        raise DataError(f"unknown bundled corpus {name!r}; choose one of {', '.join(BUNDLED_CORPORA)}")
    return resources.files("avss.corpus").joinpath(f"{name}.txt").read_text(encoding="utf-8")


def split_paragraphs(text: str) -> list[str]:
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def read_text_file(path: str | Path, field: str = "text") -> list[str]:
    """Texts from a ``.txt`` file (blank-line separated paragraphs) or ``.jsonl`` with a ``text`` field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        missing = [i for i, row in enumerate(rows, start=1) if not isinstance(row.get(field), str)]
        if missing:
            raise DataError(f"{path}: row {missing[0]} has no string field {field!r}")
        texts = [row[field] for row in rows if row[field].strip()]
    else:
        texts = split_paragraphs(read_utf8(path))
    if not texts:
        raise DataError(f"data file {path} is empty")
    return texts


def wikitext2_texts(data_dir: Path, split: str = "test") -> list[str]:
    """WikiText-2 paragraphs from the data directory (raw test file, or the tokenized valid file)."""
    candidates = {
        "test": ["wikitext2/wiki.test.raw", "wikitext2/test.tokens.txt"],
        "valid": ["wikitext2/valid.tokens.txt"],
    }[split]
    for relative in candidates:
        path = data_dir / relative
        if path.is_file():
            lines = read_utf8(path).splitlines()
            return [line.strip() for line in lines if line.strip() and not line.strip().startswith("= ")]
    raise DataError(
        f"WikiText-2 {split} not found under {data_dir} (looked for {', '.join(candidates)}); "
        f"pass --data-dir or set {DATA_DIR_ENV}"
    )


def hub_texts(spec: str, field: str = "text") -> list[str]:
    """Texts from a Hugging Face dataset ``NAME[:CONFIG][@SPLIT]``; needs the ``datasets`` extra and a hub."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("--dataset needs the `datasets` package: pip install 'avss-llm[datasets]'") from exc
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:
        raise DataError(f"could not load dataset {spec!r}: {exc}") from exc
    if field not in dataset.column_names:
        raise DataError(f"dataset {spec!r} has no column {field!r} (columns: {dataset.column_names})")
    return [text for text in dataset[field] if text and text.strip()]


@dataclass(frozen=True)
class TextSource:
    """Where calibration text comes from; exactly one of the fields is used, in this order of precedence."""

    data: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    bundled: str = "calibration"

    def __post_init__(self) -> None:
        """A missing file or folder fails here, before a model loads, rather than after."""
        if self.data and not Path(self.data).is_file():
            raise DataError(f"data file {self.data} does not exist")
        if self.data_dir:
            resolve_data_dir(self.data_dir)

    def describe(self) -> dict[str, Any]:
        if self.data:
            return {"kind": "file", "path": str(self.data), "sha256": file_sha256(self.data)}
        if self.dataset:
            return {"kind": "hub", "dataset": self.dataset}
        if self.data_dir:
            return {"kind": "wikitext2", "data_dir": str(self.data_dir), "split": "valid"}
        return {"kind": "bundled", "name": self.bundled}

    def load(self) -> list[str]:
        if self.data:
            return read_text_file(self.data)
        if self.dataset:
            return hub_texts(self.dataset)
        if self.data_dir:
            path = resolve_data_dir(self.data_dir)
            assert path is not None
            return wikitext2_texts(path, "valid")
        return split_paragraphs(bundled_text(self.bundled))


@dataclass
class TokenBatches:
    """Padded calibration batches: ``input_ids`` and ``attention_mask`` per batch, right-padded."""

    batches: list[dict[str, torch.Tensor]]

    @property
    def num_tokens(self) -> int:
        return int(sum(batch["attention_mask"].sum() for batch in self.batches))

    @property
    def num_sequences(self) -> int:
        return sum(batch["input_ids"].shape[0] for batch in self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def tokenize_texts(
    tokenizer: Any,
    texts: list[str],
    *,
    samples: int | None = 64,
    max_length: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    min_tokens: int = 2,
    part: int = 0,
) -> TokenBatches:
    """Tokenize the texts into ``samples`` sequences of up to ``max_length`` tokens, packed greedily.

    Texts are concatenated and cut into windows so short paragraphs still fill a sequence, then ``samples``
    windows are drawn with a seeded shuffle. Sequences are sorted by length within the draw so batches waste
    little padding. ``part`` k takes the k-th block of ``samples`` windows of the same shuffle, so parts
    0, 1, ... of one text are disjoint calibration sets.
    """
    if not texts:
        raise DataError("no calibration text: the data source is empty")
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    if len(ids) < min_tokens:
        raise DataError(
            f"calibration text has {len(ids)} token(s); at least {min_tokens} are needed. Provide more text"
        )
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    window = max(max_length - len(bos), 1)
    windows = [bos + ids[start : start + window] for start in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= min_tokens]
    random.Random(seed).shuffle(windows)
    if part and samples is None:
        raise DataError("calibration part > 0 needs a number of samples per part")
    if samples is not None:
        if part and len(windows) < (part + 1) * samples:  # part 0 keeps what there is, as always
            raise DataError(
                f"calibration part {part} needs {(part + 1) * samples} windows of {max_length} tokens; "
                f"the text has {len(windows)}. Provide more text or fewer --samples"
            )
        windows = windows[part * samples : (part + 1) * samples]
    windows.sort(key=len, reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w) for w in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, w in enumerate(chunk):
            input_ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return TokenBatches(batches)


@dataclass
class CalibrationOptions:
    """How calibration text becomes batches."""

    samples: int | None = 64
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    part: int = 0  # which disjoint block of ``samples`` windows of the seeded shuffle (tokenize_texts)

    def __post_init__(self) -> None:
        """Reject impossible sizes before any model or text is loaded."""
        if self.samples is not None and self.samples < 1:
            raise OptionError(f"calibration samples must be at least 1, got {self.samples}")
        if self.max_length < 2:
            raise OptionError(f"calibration max_length must be at least 2 tokens, got {self.max_length}")
        if self.batch_size < 1:
            raise OptionError(f"calibration batch_size must be at least 1, got {self.batch_size}")
        if self.part < 0 or (self.part and self.samples is None):
            raise OptionError(f"calibration part must be >= 0 and needs a number of samples, got {self.part}")

    def batches(self, tokenizer: Any, source: TextSource) -> TokenBatches:
        """Load ``source`` and cut it into padded calibration batches with these options."""
        return tokenize_texts(
            tokenizer,
            source.load(),
            samples=self.samples,
            max_length=self.max_length,
            batch_size=self.batch_size,
            seed=self.seed,
            part=self.part,
        )
