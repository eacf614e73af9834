"""Question-level cross-validation folds, the answer-leakage filter and refusal-style targets.

A question's fold is a pure function of its text, the fold count and a seed (:func:`fold_of`), like
:func:`avss.hallucination.pairs.split_of`: every pair, evaluation document or source that shares a question
lands in the same fold whatever order it is read in, and no list of questions has to travel with a run. The
price is that folds are balanced only in expectation (527 questions in 5 folds: 105 +/- 9 each).

Inside the training folds a seeded share of the questions is set aside for validation (learning rate, steps,
early stopping, steering strength), so choices are never made on the test fold.

The leakage filter answers a reviewer's worry about TruthfulQA: many true answers recur verbatim across
questions ("I have no comment" 84 times), so a gain on test questions whose true answers were training targets
can be learned answer style rather than less hallucination. :func:`leakage_free` keeps the test questions
none of whose true answers occur among the training answers; :func:`is_refusal` lets training drop
refusal-style targets altogether.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from avss.errors import OptionError
from avss.hallucination.pairs import SPLITS, Splitter

FOLD_SALT = "avss-eavss-folds-v1"
VALIDATION_SALT = "avss-eavss-fold-validation-v1"
# The share of the training folds' questions held out for validation: about the 15% of all questions the
# fixed train/validation/test split gives it, with 5 folds.
VALIDATION_FRACTION = 0.2


def question_key(question: str) -> str:
    """The text a question is identified by: stripped, as in :func:`~avss.hallucination.pairs.split_of`."""
    return question.strip()


def _point(salt: str, seed: int, question: str) -> float:
    """A salted sha1 of the question mapped to [0, 1): uniform and independent across salts and seeds."""
    digest = hashlib.sha1(f"{salt}\0{seed}\0{question_key(question)}".encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


def fold_of(question: str, folds: int, seed: int = 0) -> int:
    """The fold (``0 .. folds - 1``) of ``question``."""
    return min(int(_point(FOLD_SALT, seed, question) * folds), folds - 1)


@dataclass(frozen=True)
class Folds:
    """``folds``-fold question-level cross-validation with seed ``seed``; ``fold`` selects the test fold.

    The training questions of fold ``f`` are those of every other fold, less the ``validation_fraction`` of
    them (by an independent salted hash) that validate.
    """

    folds: int = 5
    seed: int = 0
    validation_fraction: float = VALIDATION_FRACTION

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise OptionError(f"--folds must be at least 2, got {self.folds}")
        if not 0 <= self.validation_fraction < 1:
            raise OptionError(f"the validation fraction must be in [0, 1), got {self.validation_fraction}")

    def fold_of(self, question: str) -> int:
        return fold_of(question, self.folds, self.seed)

    def check(self, fold: int) -> None:
        if not 0 <= fold < self.folds:
            raise OptionError(f"--fold must be in 0..{self.folds - 1}, got {fold}")

    def split(self, question: str, fold: int) -> str:
        """``test`` in fold ``fold``; otherwise ``validation`` or ``train``."""
        if self.fold_of(question) == fold:
            return "test"
        validates = _point(VALIDATION_SALT, self.seed, question) < self.validation_fraction
        return "validation" if validates else "train"

    def splitter(self, fold: int) -> Splitter:
        """``question -> split`` for test fold ``fold``, in the form pair loading and evaluation take."""
        self.check(fold)
        return lambda question: self.split(question, fold)

    def assign(self, questions: Iterable[str]) -> list[FoldSplit]:
        """Every fold's train, validation and test questions (sorted keys) among ``questions``."""
        keys = sorted({question_key(q) for q in questions})
        return [
            FoldSplit(
                fold,
                *(tuple(k for k in keys if self.split(k, fold) == name) for name in SPLITS),
            )
            for fold in range(self.folds)
        ]


@dataclass(frozen=True)
class FoldSplit:
    """The question keys of one fold's train, validation and test parts."""

    fold: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]


def normalize_answer(text: str) -> str:
    """Lowercase with whitespace runs collapsed: what "the same answer verbatim" compares."""
    return " ".join(text.lower().split())


def leakage_free(test_answers: Mapping[str, Sequence[str]], train_answers: Iterable[str]) -> list[str]:
    """The test questions (keys of ``test_answers``, in order) none of whose true answers appears verbatim,
    after :func:`normalize_answer`, among ``train_answers`` (every answer text the training questions carry).
    """
    seen = {normalize_answer(answer) for answer in train_answers}
    return [
        question
        for question, answers in test_answers.items()
        if not any(normalize_answer(answer) in seen for answer in answers)
    ]


# Whole answers that decline to answer rather than state anything, after lowercasing, straightening quotes
# and dropping end punctuation. TruthfulQA's is "I have no comment"; the rest are its close variants.
_REFUSAL = re.compile(
    r"(i have no comment|no comment|i (?:do not|don't) know|i have no idea|i(?:'m| am) not sure"
    r"|i (?:cannot|can't) (?:answer|say|comment)(?: that| this)?"
    r"|i(?: would|'d) rather not (?:answer|say|comment))"
)


def is_refusal(answer: str) -> bool:
    """Whether ``answer`` is a refusal-style target such as "I have no comment." (not "Nobody knows": that
    one asserts something)."""
    text = normalize_answer(answer).replace("\u2019", "'").rstrip(" .!")
    return _REFUSAL.fullmatch(text) is not None
