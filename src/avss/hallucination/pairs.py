"""Paired samples: one question with a truthful answer (T) and hallucinated answers (H).

Sources register themselves in :data:`PAIR_SOURCES`; each reads the shared data directory and returns
:class:`Pair` objects. The split of a pair is a pure function of its question text (:func:`split_of`), so a
question can never appear in two splits, whatever source or order it comes from.

The hash is *salted*: the shared data files were themselves cut from their held-out halves by sorting the
unsalted ``sha1(question)``, so every shared question sits in the low part of that hash range and an unsalted
bucket rule would leave the top buckets (our test split) empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avss.data import read_jsonl
from avss.errors import DataError
from avss.io import atomic_write_text, to_json

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_SALT = "avss-eavss-split-v1"

# A question -> its split name (one of SPLITS), or None where it takes part in none: the fixed split is
# :func:`split_of`; cross-validation folds (:mod:`avss.hallucination.folds`) give one per test fold.
Splitter = Callable[[str], str | None]


def split_of(question: str, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
    """The split of ``question``: a salted sha1 of the stripped text mapped to a point of [0, 1)."""
    digest = hashlib.sha1(f"{SPLIT_SALT}\0{question.strip()}".encode()).hexdigest()
    point = int(digest[:15], 16) / 16**15
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if point < cumulative:
            return name
    return SPLITS[-1]


@dataclass(frozen=True)
class Pair:
    """One question with its truthful answer and hallucinated alternatives, as the model sees them.

    ``prompt`` is the text the answers continue (it ends without a trailing space; answers start with one).
    """

    source: str
    id: str
    question: str
    prompt: str
    truthful: str
    hallucinated: tuple[str, ...]

    @property
    def split(self) -> str:
        return split_of(self.question)


PairLoader = Callable[[Path], list[Pair]]
PAIR_SOURCES: dict[str, PairLoader] = {}


def register_source(name: str) -> Callable[[PairLoader], PairLoader]:
    def decorator(loader: PairLoader) -> PairLoader:
        PAIR_SOURCES[name] = loader
        return loader

    return decorator


def _distinct(truthful: str, candidates: Iterable[str]) -> tuple[str, ...]:
    """Hallucinated answers: non-empty, unique, and never equal to the truthful one (SciQ has such rows)."""
    seen = {truthful.strip().lower()}
    kept = []
    for candidate in candidates:
        key = candidate.strip().lower()
        if key and key not in seen:
            seen.add(key)
            kept.append(candidate.strip())
    return tuple(kept)


def _pairs(
    source: str, rows: Iterable[dict[str, Any]], make: Callable[[dict[str, Any]], Pair | None]
) -> list[Pair]:
    pairs = [pair for row in rows if (pair := make(row)) is not None and pair.hallucinated]
    if not pairs:
        raise DataError(f"pair source {source!r} produced no pairs")
    return pairs


def qa_prompt(question: str) -> str:
    """The TruthfulQA QA format, also used for the other sources so every pair reads the same way."""
    return f"Q: {question.strip()}\nA:"


@register_source("truthfulqa")
def truthfulqa_pairs(data_dir: Path) -> list[Pair]:
    """Best answer vs the listed incorrect answers (``truthfulqa_gen.jsonl``)."""
    rows = read_jsonl(data_dir / "truthfulqa" / "truthfulqa_gen.jsonl")
    return _pairs(
        "truthfulqa",
        rows,
        lambda row: Pair(
            "truthfulqa",
            row["id"],
            row["question"],
            qa_prompt(row["question"]),
            row["best_answer"].strip(),
            _distinct(row["best_answer"], [row["best_incorrect_answer"], *row["incorrect_answers"]]),
        ),
    )


@register_source("sciq")
def sciq_pairs(data_dir: Path) -> list[Pair]:
    """Gold answer vs the three distractors, from both shared SciQ files."""
    rows = [
        *read_jsonl(data_dir / "sciq" / "sciq_valid.jsonl"),
        *read_jsonl(data_dir / "sciq" / "sciq_test.jsonl"),
    ]
    return _pairs(
        "sciq",
        rows,
        lambda row: Pair(
            "sciq",
            row["id"],
            row["question"],
            qa_prompt(row["question"]),
            row["correct_answer"].strip(),
            _distinct(row["correct_answer"], [c for i, c in enumerate(row["choices"]) if i != row["label"]]),
        ),
    )


@register_source("wikiqa")
def wikiqa_pairs(data_dir: Path) -> list[Pair]:
    """The first correct candidate sentence vs the incorrect ones (questions with both kinds only)."""
    rows = [
        *read_jsonl(data_dir / "wikiqa" / "wikiqa_dev_filtered.jsonl"),
        *read_jsonl(data_dir / "wikiqa" / "wikiqa_test_filtered.jsonl"),
    ]

    def make(row: dict[str, Any]) -> Pair | None:
        good = [c for c, label in zip(row["candidates"], row["labels"], strict=True) if label]
        bad = [c for c, label in zip(row["candidates"], row["labels"], strict=True) if not label]
        if not good:
            return None
        return Pair(
            "wikiqa",
            row["id"],
            row["question"],
            qa_prompt(row["question"]),
            good[0].strip(),
            _distinct(good[0], bad),
        )

    return _pairs("wikiqa", rows, make)


OPEN_QA_FILES = {"nq": "nq_open/nq_open_dev.jsonl", "triviaqa": "triviaqa/triviaqa_dev.jsonl"}


def open_qa_pairs(rows: Iterable[dict[str, Any]], greedy: dict[str, str], source: str) -> list[Pair]:
    """Gold answer vs the model's own greedy answer where it fails exact match (``greedy``: id -> answer)."""
    from avss.evaluation.metrics import exact_match

    def make(row: dict[str, Any]) -> Pair | None:
        answer = greedy.get(row["id"], "").strip()
        if not answer or exact_match(answer, row["answers"]):
            return None
        gold = row["answers"][0].strip()
        return Pair(
            source, row["id"], row["question"], qa_prompt(row["question"]), gold, _distinct(gold, [answer])
        )

    return _pairs(source, rows, make)


def greedy_answers(
    generate: Callable[[list[str]], list[str]], rows: Sequence[dict[str, Any]], cache: Path
) -> dict[str, str]:
    """The model's greedy answers, generated once and cached as JSON lines (``id``, ``answer``) at ``cache``.

    Rows already in the cache are not generated again, so a larger ``--limit`` later only adds the new ones.
    """
    known = {row["id"]: row["answer"] for row in read_jsonl(cache)} if cache.is_file() else {}
    missing = [row for row in rows if row["id"] not in known]
    if missing:
        answers = generate([qa_prompt(row["question"]) for row in missing])
        known.update(zip((row["id"] for row in missing), answers, strict=True))
        lines = "".join(
            to_json({"id": key, "answer": value}).replace("\n", "") + "\n" for key, value in known.items()
        )
        atomic_write_text(cache, lines)
    return known


def load_pairs(
    sources: Sequence[str],
    data_dir: Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    generate: Callable[[list[str]], list[str]] | None = None,
    cache_dir: Path | None = None,
    splitter: Splitter = split_of,
) -> list[Pair]:
    """Pairs of the named sources, optionally one split only (as ``splitter`` assigns questions), at most
    ``limit`` per source.

    ``nq`` and ``triviaqa`` need ``generate`` (prompts -> greedy answers) and a ``cache_dir`` for the answers;
    ``limit`` applies to their questions before generation, since generation is the expensive step.
    """
    unknown = [s for s in sources if s not in PAIR_SOURCES and s not in OPEN_QA_FILES]
    if unknown:
        known = ", ".join([*PAIR_SOURCES, *OPEN_QA_FILES])
        raise DataError(f"unknown pair source(s) {', '.join(unknown)}; choose from {known}")
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    pairs: list[Pair] = []
    for source in sources:
        if source in OPEN_QA_FILES:
            if generate is None or cache_dir is None:
                raise DataError(
                    f"pair source {source!r} needs the model's own answers: pass a model and --out"
                )
            rows = [
                r
                for r in read_jsonl(data_dir / OPEN_QA_FILES[source])
                if split in (None, splitter(r["question"]))
            ]
            rows = rows[:limit]
            greedy = greedy_answers(generate, rows, cache_dir / f"greedy_{source}.jsonl")
            selected = open_qa_pairs(rows, greedy, source)
        else:
            loaded = PAIR_SOURCES[source](data_dir)
            selected = [p for p in loaded if split in (None, splitter(p.question))][:limit]
        pairs.extend(selected)
    return pairs


def describe_pairs(pairs: Sequence[Pair], splitter: Splitter = split_of) -> dict[str, Any]:
    """Counts per source and split (``splitter``'s, so fold runs count their folds' parts), recorded in every
    output."""
    counts: dict[str, dict[str, int]] = {}
    for pair in pairs:
        per_source = counts.setdefault(pair.source, {})
        split = str(splitter(pair.question))
        per_source[split] = per_source.get(split, 0) + 1
    return {"num_pairs": len(pairs), "counts": counts}
