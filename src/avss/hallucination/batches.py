"""Prompt + answer token batches whose ``stat_mask`` (and ``answer_mask``) covers the answer tokens only.

The same encoding serves statistics (``stat_mask`` for :func:`avss.stats.collect.collect_statistics`) and
training (``answer_mask`` for the LM loss, ``prompt_mask`` for the question's pooled representation). Answer
tokens are those of ``prompt + " " + answer`` beyond the tokens of ``prompt``, as in the evaluation engine, so
word boundaries are tokenized the way the model reads the full text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from avss.hallucination.pairs import Pair


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt + answer and where the answer starts."""

    ids: list[int]
    answer_start: int


def encode(tokenizer: Any, prompt: str, answer: str, max_length: int) -> Encoded:
    """Tokenize ``prompt + " " + answer``; an over-long text loses prompt tokens first, then answer tokens."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(f"{prompt} {answer}")["input_ids"])
    answer_ids = full[len(prompt_ids) :] or full[-1:]
    answer_ids = answer_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
    return Encoded(prompt_ids + answer_ids, len(prompt_ids))


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``attention_mask``, ``prompt_mask`` and ``answer_mask`` (= ``stat_mask``)."""
    width = max(len(e.ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    answer = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, item in enumerate(encoded):
        input_ids[row, : len(item.ids)] = torch.tensor(item.ids)
        attention[row, : len(item.ids)] = 1
        answer[row, item.answer_start : len(item.ids)] = True
    prompt = attention.bool() & ~answer
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "prompt_mask": prompt,
        "answer_mask": answer,
        "stat_mask": answer,
    }


def pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def answer_batches(
    tokenizer: Any,
    pairs: Sequence[Pair],
    kind: str,
    *,
    max_length: int = 128,
    batch_size: int = 8,
    max_hallucinated: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of every pair's truthful (``kind="truthful"``) or hallucinated answers, for statistics."""
    if kind not in ("truthful", "hallucinated"):
        raise ValueError(f"kind must be truthful or hallucinated, got {kind!r}")
    texts = [
        (pair.prompt, answer)
        for pair in pairs
        for answer in ((pair.truthful,) if kind == "truthful" else pair.hallucinated[:max_hallucinated])
    ]
    encoded = sorted((encode(tokenizer, p, a, max_length) for p, a in texts), key=lambda e: len(e.ids))
    pad = pad_id(tokenizer)
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def contrastive_batches(
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    negatives: int = 2,
    max_length: int = 128,
    questions_per_batch: int = 4,
) -> list[dict[str, torch.Tensor]]:
    """Training batches of ``questions_per_batch`` groups, each the truthful answer then ``negatives``
    hallucinated ones (cycled when a question has fewer), so rows ``g * (1 + negatives)`` are the positives.
    """
    group = 1 + negatives
    pad = pad_id(tokenizer)
    batches = []
    for start in range(0, len(pairs), questions_per_batch):
        rows = []
        for pair in pairs[start : start + questions_per_batch]:
            wrong = [pair.hallucinated[i % len(pair.hallucinated)] for i in range(negatives)]
            rows.extend(
                encode(tokenizer, pair.prompt, answer, max_length) for answer in (pair.truthful, *wrong)
            )
        batch = collate(rows, pad)
        batch["group_size"] = torch.tensor(group)
        batches.append(batch)
    return batches
