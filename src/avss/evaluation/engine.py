"""Model plumbing shared by every task: batched log-likelihoods, greedy generation, rolling NLL, embeddings.

Tasks never call the model themselves. They hand :class:`LanguageModel` plain strings, so batching,
padding, tokenization boundaries and memory limits are solved once, here, as lm-evaluation-harness's ``HFLM``
does.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from avss.errors import OptionError
from avss.evaluation.metrics import perplexity_from_nll

# Upper bound on the float32 logits (and their log-softmax) held at once. Vocabularies reach 262k entries
# (Gemma 3), so one 1024-token row already needs 1 GiB: the batch size alone cannot bound memory.
LOGITS_BUDGET_BYTES = 2 << 30
# Float32 elements per log-sum-exp chunk in :func:`_pick` (4 MiB: a few vocabulary rows, cache-resident).
PICK_CHUNK_ELEMENTS = 1 << 20


class Progress(Protocol):
    """Receives work counts as the engine goes; the CLI draws them as a progress bar."""

    def add_total(self, n: int) -> None: ...

    def advance(self, n: int) -> None: ...


class _NoProgress:
    def add_total(self, n: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` given ``context``: ``log p(continuation | context)``, summed over its tokens."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float
    is_greedy: bool
    num_tokens: int
    # Each scored token's log-probability (``logprob`` is their sum); rolling_nll splits them by document.
    token_logprobs: tuple[float, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class NLL:
    """Summed negative log-likelihood (nats) over ``num_tokens`` predicted tokens.

    ``per_text`` splits both over the scored texts, ``(nll, tokens)`` per text, each token counted in the
    text it starts in (the blank line after a text belongs to it); empty when the tokenizer gives no
    character offsets (slow tokenizers).
    """

    total: float
    num_tokens: int
    per_text: tuple[tuple[float, int], ...] = field(default=(), compare=False, repr=False)

    @property
    def mean(self) -> float:
        return self.total / self.num_tokens

    @property
    def perplexity(self) -> float:
        return perplexity_from_nll(self.total, self.num_tokens)


@dataclass(frozen=True)
class Work:
    """What scoring a set of requests asks of the model: ``forwards`` batches, ``body_tokens`` positions
    through the transformer blocks (padding included) and ``head_positions`` through the LM head; with the
    model's weights per token these are its multiply-accumulates (``benchmarks/eval_work.py``)."""

    forwards: int = 0
    body_tokens: int = 0
    head_positions: int = 0
    requests: int = 0
    packed_requests: int = 0

    def plus(self, rows: int, width: int, keep: int, keeps_logits: bool) -> Work:
        """This work and one forward of ``rows`` rows of ``width`` tokens that keeps ``keep`` positions of
        logits per row (all of them where the model cannot be asked to keep fewer)."""
        return replace(
            self,
            forwards=self.forwards + 1,
            body_tokens=self.body_tokens + rows * width,
            head_positions=self.head_positions + rows * (keep if keeps_logits else width),
        )


Sequence_ = tuple[list[int], int]  # a request's tokens, the last ``n`` of which are scored


@dataclass(frozen=True)
class _Plan:
    """How a set of encoded requests is run (indices into them): ``groups`` of requests packed into one
    row each, shared ``contexts`` scored on a KV cache (context tokens -> requests), the ``rest`` alone."""

    groups: list[list[int]]
    contexts: dict[tuple[int, ...], list[int]]
    rest: list[int]


# Packed rows stay below this many tokens: their attention mask is (batch, width, width).
PACKED_WIDTH = 2048
# A request joins a packed row only if that saves this share of its tokens: attention over a packed row is
# computed densely, so packing sequences that share little (a BOS token) would cost more than it saves.
MIN_SHARED = 0.25


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass(frozen=True)
class _PackedRow:
    """Requests sharing a prefix as one sequence: ``prefix + s_1[p:-1] + s_2[p:-1] + ...``.

    Each sequence's last token is only a target. ``positions`` restart after the prefix for every branch, so
    each request is scored at the positions it would have alone; ``segments`` say which part a token belongs
    to (0 the prefix, i the i-th branch) for the attention mask.
    """

    sequences: list[Sequence_]
    prefix: int
    tokens: list[int]
    positions: list[int]
    segments: list[int]

    @classmethod
    def of(cls, sequences: Sequence[Sequence_]) -> _PackedRow:
        first = sequences[0][0]
        # Every branch keeps at least its last input, so the prefix stops before the shortest sequence's end.
        prefix = min([len(tokens) - 1 for tokens, _ in sequences] + [_shared(sequences)])
        tokens, positions, segments = first[:prefix], list(range(prefix)), [0] * prefix
        for index, (sequence, _) in enumerate(sequences, 1):
            inputs = sequence[prefix:-1]
            tokens = tokens + inputs
            positions += range(prefix, prefix + len(inputs))
            segments += [index] * len(inputs)
        return cls(list(sequences), prefix, tokens, positions, segments)

    def predictors(self) -> list[list[int]]:
        """Per sequence, the packed indices whose outputs predict its ``n`` scored tokens."""
        out, offset = [], self.prefix
        for tokens, n in self.sequences:
            # Sequence position t predicts token t + 1; t sits in the prefix or at offset + (t - prefix).
            first = len(tokens) - n - 1
            out.append(
                [t if t < self.prefix else offset + t - self.prefix for t in range(first, len(tokens) - 1)]
            )
            offset += len(tokens) - 1 - self.prefix
        return out

    @property
    def keep(self) -> int:
        """Trailing positions that hold every prediction."""
        return len(self.tokens) - min(index for indices in self.predictors() for index in indices)


def _shared(sequences: Sequence[Sequence_]) -> int:
    first = sequences[0][0]
    return min((_common_prefix(first, tokens) for tokens, _ in sequences[1:]), default=len(first))


def _packed_cost(sequences: Sequence[Sequence_]) -> int:
    """Tokens a packed row of ``sequences`` runs (one sequence alone: its inputs)."""
    return len(_PackedRow.of(sequences).tokens)


def _packed_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``(batch, 1, width, width)`` mask of packed rows: a token sees the earlier tokens of the
    context and of its own segment; padding (segment -1) sees only itself, so no softmax row is empty."""
    query, key = segments[:, :, None], segments[:, None, :]
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass(frozen=True)
class _Row:
    """Tokens fed to the model plus the one they predict last; the final ``n`` tokens are scored."""

    tokens: list[int]
    n: int

    @classmethod
    def truncated(cls, tokens: list[int], n: int, max_length: int) -> _Row:
        """Drop context from the left so the model input fits ``max_length``; scored tokens are kept."""
        tokens = tokens[-(max_length + 1) :]
        return cls(tokens, min(n, len(tokens) - 1))

    @property
    def inputs(self) -> list[int]:
        return self.tokens[:-1]

    @property
    def targets(self) -> list[int]:
        return self.tokens[-self.n :]


def _padded(
    sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists stacked into ``(input_ids, attention_mask)``, padded on the right (or the left)."""
    width = max(len(tokens) for tokens in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        input_ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _keep_width(rows: Sequence[_Row]) -> int:
    """How many trailing positions of a right-padded batch hold every row's scoring positions."""
    width = max(len(row.inputs) for row in rows)
    return width - min(len(row.inputs) - row.n for row in rows)


def _pick(logits: torch.Tensor, targets: list[int], normalize: bool = True) -> Loglikelihood:
    """Summed log-probability of ``targets`` under per-position ``logits`` [len(targets), vocab].

    Normalizes only the picked entries (logit minus the row's log-sum-exp) instead of materializing a
    vocabulary-wide log-softmax: for a 1024-token window and a 262k vocabulary that tensor is 1 GB. The
    log-sum-exp runs over float32 copies of a few rows at a time (:data:`PICK_CHUNK_ELEMENTS`), which stay in
    cache: on a 1024 x 49k window that is 3x faster than one pass over a float32 copy of it, with the same
    result (each row's reduction is unchanged). With ``normalize`` false the logits are already per-token
    scores and are summed as they are.
    """
    target = torch.tensor(targets, device=logits.device)
    raw = logits.gather(-1, target[:, None]).squeeze(-1)
    picked = raw.float()
    if normalize:
        rows = max(1, PICK_CHUNK_ELEMENTS // logits.shape[-1])
        picked = picked - torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(rows)])
    # Greedy means every target is its row's argmax. A target below its row's maximum settles it without an
    # argmax pass; only when all reach the maximum does argmax decide ties (first index, as lm-eval).
    greedy = bool((raw == logits.amax(-1)).all()) and bool((logits.argmax(-1) == target).all())
    return Loglikelihood(float(picked.sum()), greedy, len(targets), tuple(picked.tolist()))


def is_causal_lm(model: Any) -> bool:
    """True for models with a language-modelling head that can generate (not BERT-like encoders)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate()) and model.get_output_embeddings() is not None


class LanguageModel:
    """A Hugging Face model and tokenizer behind string-level scoring and generation.

    Tokenization follows lm-evaluation-harness: a request's continuation tokens are those of
    ``context + continuation`` beyond the tokens of ``context``, so word-boundary merges are scored the way
    the model would actually see the text. Special tokens the tokenizer puts in front of every text (a BOS
    token, for Llama and Gemma tokenizers) are prepended once to each sequence.

    With ``share_context`` (the default), continuations of one context (a question's answer options) are
    scored against a single KV cache of the context: the context runs once instead of once per option.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        progress: Progress | None = None,
        share_context: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or _model_max_length(model)
        self.progress: Progress = progress or _NoProgress()
        self.device = next(model.parameters()).device
        self.prefix_ids = _leading_special_tokens(tokenizer)
        self.pad_id = _pad_id(tokenizer)
        parameters = inspect.signature(model.forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in parameters
        # The KV-cache argument (and output field) is `cache` from transformers 5.x, `past_key_values` before.
        self._cache_name = next((name for name in ("cache", "past_key_values") if name in parameters), None)
        self.share_context = share_context  # packed rows need position ids; the cache path, a KV cache
        self._accepts_position_ids = "position_ids" in parameters
        self._attention_window = _attention_window(model)
        # Wrappers whose ``.logits`` are already the per-token scores to sum (DoLa's contrast) say so.
        self._normalize = not getattr(model, "logits_are_scores", False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- log-likelihood ------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Score every request; identical requests (a primer shared by many choices, say) are scored once.

        Requests that share a prefix run it once (:meth:`_prefix_groups`); the rest go in plain batches.
        """
        unique = list(dict.fromkeys(requests))
        sequences = [self.encode_request(request) for request in unique]
        self.progress.add_total(len(sequences))
        plan = self._plan(sequences)
        scores: dict[int, Loglikelihood] = {}
        rows = [_PackedRow.of([sequences[i] for i in group]) for group in plan.groups]
        for group, scored in zip(plan.groups, self._score_packed(rows), strict=True):
            scores.update(zip(group, scored, strict=True))
        for context, members in plan.contexts.items():
            continuations = [sequences[i][0][-sequences[i][1] :] for i in members]
            scores.update(zip(members, self._score_on_cache(list(context), continuations), strict=True))
        scores.update(zip(plan.rest, self._score_tails([sequences[i] for i in plan.rest]), strict=True))
        by_request = {request: scores[i] for i, request in enumerate(unique)}
        return [by_request[request] for request in requests]

    def work(self, requests: Sequence[LoglikelihoodRequest]) -> Work:
        """What :meth:`loglikelihood` of ``requests`` asks of the model, without running it: the batches it
        would run, from the same packing and batching plan, summed (:class:`Work`)."""
        unique = list(dict.fromkeys(requests))
        sequences = [self.encode_request(request) for request in unique]
        plan = self._plan(sequences)
        work = Work()
        packed = [_PackedRow.of([sequences[i] for i in group]) for group in plan.groups]
        for batch in self._packed_batches(packed):
            width = max(len(packed[i].tokens) for i in batch)
            keep = max(packed[i].keep for i in batch)
            work = work.plus(len(batch), width, keep, self._accepts_logits_to_keep)
        for context, members in plan.contexts.items():
            work = work.plus(1, len(context), 1, self._accepts_logits_to_keep)
            continuations = [sequences[i][0][-sequences[i][1] :] for i in members]
            for batch in self._cache_batches(continuations):
                width = max(len(continuations[i]) for i in batch) - 1
                if width > 0:
                    work = work.plus(len(batch), width, width, True)
        rows = self._tail_rows([sequences[i] for i in plan.rest])
        for batch in self._tail_batches(rows):
            width = max(len(rows[i].inputs) for i in batch)
            work = work.plus(
                len(batch), width, _keep_width([rows[i] for i in batch]), self._accepts_logits_to_keep
            )
        packed_requests = sum(len(group) for group in plan.groups)
        return replace(work, requests=len(sequences), packed_requests=packed_requests)

    def _plan(self, sequences: Sequence[Sequence_]) -> _Plan:
        """Which requests run as packed rows, which on a shared context's KV cache (models that cannot
        pack), and which in plain batches: the one decision :meth:`loglikelihood` and :meth:`work` share."""
        groups = self._prefix_groups(sequences) if self._can_pack else []
        contexts = {} if self._can_pack else self._shared_contexts(sequences)
        shared = {i for members in [*groups, *contexts.values()] for i in members}
        return _Plan(groups, contexts, [i for i in range(len(sequences)) if i not in shared])

    @property
    def _can_pack(self) -> bool:
        return self.share_context and self._accepts_position_ids

    def _prefix_groups(self, sequences: Sequence[Sequence_]) -> list[list[int]]:
        """Runs of consecutive requests (tasks list a document's requests together) whose packed row runs
        fewer tokens than the requests alone: a SciQ passage before four answers, a WinoGrande sentence
        start before its two fillings. Groups of one are left to the plain batches.

        A request joins the group before it only if the row stays within the window (the model's and any
        sliding attention window, which a custom mask would not enforce) and saves at least
        ``MIN_SHARED`` of the request's tokens against running the two apart.
        """
        window = min(self.max_length, self._attention_window or self.max_length)
        groups: list[list[int]] = []
        current: list[int] = []
        current_cost = 0  # tokens of the current group's packed row
        for index, (tokens, _) in enumerate(sequences):
            if len(tokens) > window:
                continue  # truncated from the left alone: nothing to share
            if current:
                cost = _packed_cost([*(sequences[i] for i in current), sequences[index]])
                saved = current_cost + len(tokens) - 1 - cost
                if cost <= PACKED_WIDTH and saved >= MIN_SHARED * (len(tokens) - 1):
                    current.append(index)
                    current_cost = cost
                    continue
            if len(current) > 1:
                groups.append(current)
            current, current_cost = [index], len(tokens) - 1
        if len(current) > 1:
            groups.append(current)
        return groups

    def _shared_contexts(self, sequences: Sequence[Sequence_]) -> dict[tuple[int, ...], list[int]]:
        """For models that cannot pack (no position ids): contexts shared by several requests whose
        sequences fit the window, where the context repeats a KV cache saves outweigh the continuations
        (sharing costs an extra forward on this path)."""
        if not self.share_context or self._cache_name is None:
            return {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (tokens, n) in enumerate(sequences):
            groups.setdefault(tuple(tokens[:-n]), []).append(index)
        return {
            context: members
            for context, members in groups.items()
            if all(len(sequences[i][0]) <= self.max_length for i in members)
            and (len(members) - 1) * len(context) >= sum(sequences[i][1] for i in members)
        }

    def _score_packed(self, rows: Sequence[_PackedRow]) -> list[list[Loglikelihood]]:
        """Packed rows, longest first, ``batch_size`` rows a forward.

        Rows are left-padded so that every row's predictions sit in the last columns, and the mask lets a
        branch see the prefix and itself only.
        """
        results: dict[int, list[Loglikelihood]] = {}
        for batch in self._packed_batches(rows):
            results.update(zip(batch, self._forward_packed([rows[i] for i in batch]), strict=True))
            self.progress.advance(sum(len(rows[i].sequences) for i in batch))
        return [results[i] for i in range(len(rows))]

    def _packed_batches(self, rows: Sequence[_PackedRow]) -> list[list[int]]:
        """The indices of ``rows`` each forward runs: longest first, ``batch_size`` at a time, fewer where
        their kept logits would pass the memory budget."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
        return self._batched(order, lambda batch: max(rows[i].keep for i in batch))

    @torch.inference_mode()
    def _forward_packed(self, rows: list[_PackedRow]) -> list[list[Loglikelihood]]:
        width = max(len(row.tokens) for row in rows)
        keep = max(row.keep for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding, 0: prefix, i: branch i
        for r, row in enumerate(rows):
            span = slice(width - len(row.tokens), width)
            input_ids[r, span] = torch.tensor(row.tokens)
            positions[r, span] = torch.tensor(row.positions)
            segments[r, span] = torch.tensor(row.segments)
        dtype = next(self.model.parameters()).dtype
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._accepts_logits_to_keep else {}
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=_packed_mask(segments, dtype).to(self.device),
            position_ids=positions.to(self.device),
            use_cache=False,
            **kwargs,
        ).logits[:, -keep:]
        results = []
        for r, row in enumerate(rows):
            shift = keep - len(row.tokens)  # packed index p sits in kept column shift + p
            results.append(
                [
                    _pick(logits[r, [shift + p for p in predictors]], tokens[-n:], self._normalize)
                    for (tokens, n), predictors in zip(row.sequences, row.predictors(), strict=True)
                ]
            )
        return results

    @torch.inference_mode()
    def _score_on_cache(self, context: list[int], continuations: list[list[int]]) -> list[Loglikelihood]:
        """One forward over the context, then batches of continuations on rows of its KV cache (positions
        continue where the context ends)."""
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        prefix = self.model(input_ids=torch.tensor([context], device=self.device), use_cache=True, **kwargs)
        # The context's last position predicts every continuation's first token.
        first = prefix.logits[0, -1:]
        results = []
        for batch in self._cache_batches(continuations):
            chunk = [continuations[i] for i in batch]
            logits = first.new_empty(len(chunk), 0, first.shape[-1])
            if max(len(c) for c in chunk) > 1:
                # Each continuation's last token is only a target, never an input.
                input_ids, mask = _padded([c[:-1] for c in chunk], self.pad_id)
                attention_mask = torch.cat([torch.ones(len(chunk), len(context), dtype=torch.long), mask], 1)
                cache = _cache_rows(prefix[self._cache_name], torch.zeros(len(chunk), dtype=torch.long))
                logits = self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    use_cache=True,
                    **{self._cache_name: cache},
                ).logits
            for row, continuation in enumerate(chunk):
                scored = torch.cat([first, logits[row, : len(continuation) - 1]])
                results.append(_pick(scored, continuation, self._normalize))
            self.progress.advance(len(chunk))
        return results

    def encode_request(self, request: LoglikelihoodRequest) -> tuple[list[int], int]:
        """The tokens ``request`` is scored on and how many of them, at the end, are scored (lm-eval's
        ``_encode_pair``, with the tokenizer's leading special tokens in front)."""
        context, continuation = request.context, request.continuation
        # A trailing space belongs to the next word for BPE tokenizers ("A:" + " Paris", not "A: " + "Paris").
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped) :] + continuation
        context_ids = self.encode(context)
        continuation_ids = self.encode(context + continuation)[len(context_ids) :]
        if not continuation_ids:
            raise ValueError(f"continuation {request.continuation!r} encodes to no tokens")
        prefix = self.prefix_ids or ([] if context_ids else [self._fallback_prefix_id()])
        return prefix + context_ids + continuation_ids, len(continuation_ids)

    def _fallback_prefix_id(self) -> int:
        """A token to condition on when the context is empty and the tokenizer adds no BOS of its own."""
        for token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ValueError("an empty context needs a tokenizer with a BOS or EOS token")

    def _score_tails(self, sequences: Sequence[tuple[list[int], int]]) -> list[Loglikelihood]:
        """For each ``(tokens, n)``, the summed log-probability of the last ``n`` tokens given the rest.

        Sequences are sorted longest first so each batch pads little and the first batch hits any memory
        problem at once; each batch is one right-padded forward with an attention mask, so positions of real
        tokens are exactly those of an unpadded run. Only the logits that predict scored tokens are kept.
        """
        rows = self._tail_rows(sequences)
        results: dict[int, Loglikelihood] = {}
        for batch in self._tail_batches(rows):
            results.update(zip(batch, self._forward_tails([rows[i] for i in batch]), strict=True))
            self.progress.advance(len(batch))
        return [results[i] for i in range(len(rows))]

    def _tail_rows(self, sequences: Sequence[tuple[list[int], int]]) -> list[_Row]:
        return [_Row.truncated(tokens, n, self.max_length) for tokens, n in sequences]

    def _tail_batches(self, rows: Sequence[_Row]) -> list[list[int]]:
        """The indices of ``rows`` each plain forward runs: longest first, within the memory budget."""
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), rows[i].tokens))
        return self._batched(order, lambda batch: _keep_width([rows[i] for i in batch]))

    def _batched(self, order: list[int], keep: Callable[[list[int]], int]) -> list[list[int]]:
        """``order`` cut into batches of ``batch_size``, each shortened until ``keep(batch)`` positions of
        float32 logits per row fit :data:`LOGITS_BUDGET_BYTES`."""
        batches, start = [], 0
        while start < len(order):
            count = self._rows_within_budget(keep(order[start : start + self.batch_size]))
            batches.append(order[start : start + count])
            start += count
        return batches

    def _cache_batches(self, continuations: Sequence[list[int]]) -> list[list[int]]:
        """The indices of ``continuations`` each forward on a shared context's KV cache runs."""
        return self._batched(list(range(len(continuations))), lambda b: max(len(continuations[i]) for i in b))

    def _rows_within_budget(self, keep: int) -> int:
        vocab = self.model.get_output_embeddings().weight.shape[0]
        per_row = keep * vocab * 4  # float32 logits
        return max(1, min(self.batch_size, LOGITS_BUDGET_BYTES // per_row))

    @torch.inference_mode()
    def _forward_tails(self, rows: list[_Row]) -> list[Loglikelihood]:
        keep = _keep_width(rows)
        input_ids, attention_mask = _padded([row.inputs for row in rows], self.pad_id)
        width = input_ids.shape[1]
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._accepts_logits_to_keep else {}
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
            **kwargs,
        ).logits[:, -keep:]
        results = []
        for index, row in enumerate(rows):
            # Input position p predicts token p + 1, so the n targets are predicted by the last n inputs;
            # in the kept window, row's last input sits at len(inputs) - 1 - (width - keep).
            end = len(row.inputs) - (width - keep)
            results.append(_pick(logits[index, end - row.n : end], row.targets, self._normalize))
        return results

    # --- rolling log-likelihood (perplexity) -------------------------------------------------------------

    def rolling_nll(self, texts: Sequence[str], max_length: int = 1024, stride: int | None = None) -> NLL:
        """NLL of ``"\n\n".join(texts)`` scored in windows of ``max_length`` tokens moved by ``stride``.

        Every token is scored exactly once; a window scores only the tokens past the previous window's end,
        so with ``stride < max_length`` each token sees at least ``max_length - stride`` tokens of context
        (the Hugging Face perplexity recipe). The default ``stride = max_length`` gives disjoint windows, the
        convention of the pruning literature. Each window starts with the tokenizer's BOS token, if any.
        """
        if not self._normalize:
            raise OptionError(
                "perplexity needs next-token probabilities, and this model's logits are contrast scores "
                "(DoLa) that do not sum to one; score it on accuracy tasks only"
            )
        tokens, text_of_token = self._encode_texts(texts)
        body = max_length - len(self.prefix_ids)
        stride = stride or body
        if body < 1 or not 0 < stride <= body:
            raise ValueError(f"need 0 < stride <= {body} for max_length {max_length} (got stride {stride})")
        sequences, ends = [], []
        scored_until = 0
        for begin in range(0, len(tokens), stride):
            end = min(begin + body, len(tokens))
            window = self.prefix_ids + tokens[begin:end]
            n = min(end - scored_until, len(window) - 1)
            if n > 0:
                sequences.append((window, n))
                ends.append(end)
            scored_until = end
            if end == len(tokens):
                break
        if not sequences:
            raise ValueError("the text is too short to score: it needs at least two tokens")
        self.progress.add_total(len(sequences))
        results = self._score_tails(sequences)
        per_text: tuple[tuple[float, int], ...] = ()
        if text_of_token is not None:
            # A window's scored tokens are the last num_tokens before its end.
            positions = np.concatenate(
                [np.arange(end - r.num_tokens, end) for r, end in zip(results, ends, strict=True)]
            )
            logprobs = np.concatenate([np.asarray(r.token_logprobs, dtype=np.float64) for r in results])
            owners = text_of_token[positions]
            nll = np.bincount(owners, weights=-logprobs, minlength=len(texts))
            counts = np.bincount(owners, minlength=len(texts))
            per_text = tuple(zip(nll.tolist(), counts.tolist(), strict=True))
        return NLL(-sum(r.logprob for r in results), sum(r.num_tokens for r in results), per_text)

    def _encode_texts(self, texts: Sequence[str]) -> tuple[list[int], np.ndarray | None]:
        """Tokens of ``"\n\n".join(texts)`` and, where the tokenizer reports character offsets, the index
        of the text each token starts in (the separator after a text counts as part of it)."""
        joined = "\n\n".join(texts)
        try:
            encoding = self.tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow (Python) tokenizers have no offsets
            return self.encode(joined), None
        starts = np.cumsum([0] + [len(text) + 2 for text in texts[:-1]])
        token_starts = np.asarray([begin for begin, _ in encoding["offset_mapping"]], dtype=np.int64)
        owners = np.searchsorted(starts, token_starts, side="right") - 1
        return list(encoding["input_ids"]), owners

    # --- greedy generation -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], *, until: Sequence[str] = (), max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy continuations of ``prompts``, cut before the first of the ``until`` strings.

        Batches are left-padded, so every row's next token sits in the last column and ``generate`` runs
        one KV-cached step per new token for the whole batch; a row stops at EOS or at a stop string.
        """
        room = self.max_length - max_new_tokens
        encoded = [(self.prefix_ids + self.encode(prompt))[-room:] for prompt in prompts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        outputs: dict[int, str] = {}
        self.progress.add_total(len(encoded))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            input_ids, attention_mask = _padded([encoded[i] for i in batch], self.pad_id, left=True)
            width = input_ids.shape[1]
            criteria = StoppingCriteriaList([_StopOnStrings(self.tokenizer, until, width)] if until else [])
            generated = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                stopping_criteria=criteria,
            )
            texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                outputs[i] = cut_at_stop_strings(text, until)
            self.progress.advance(len(batch))
        return [outputs[i] for i in range(len(encoded))]

    # --- embeddings (probes) -----------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], max_length: int = 512) -> np.ndarray:
        """Mean of the final hidden states over each text's real tokens: one float32 row per text.

        Texts are tokenized with the tokenizer's own special tokens ([CLS] ... [SEP] for BERT), as the encoder
        saw them in training.
        """
        limit = min(max_length, self.max_length)
        encoded = [
            list(self.tokenizer(text, truncation=True, max_length=limit)["input_ids"]) for text in texts
        ]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        features: dict[int, np.ndarray] = {}
        self.progress.add_total(len(encoded))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            input_ids, attention_mask = _padded([encoded[i] for i in batch], self.pad_id)
            outputs = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                output_hidden_states=True,
                **kwargs,
            )
            hidden = outputs.hidden_states[-1].float().cpu()
            mask = attention_mask[..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            features.update(zip(batch, pooled.numpy(), strict=True))
            self.progress.advance(len(batch))
        return np.stack([features[i] for i in range(len(encoded))])


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text contains any stop string (per-row, so batches shrink)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((index for stop in stops if (index := text.find(stop)) >= 0), default=len(text))
    return text[:cut]


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
) -> float:
    """Token-level perplexity of ``texts`` (joined by blank lines) under an in-memory causal LM.

    The function the pruning study and demo call on pruned models; see :meth:`LanguageModel.rolling_nll`.
    """
    lm = LanguageModel(model, tokenizer, batch_size=batch_size)
    return lm.rolling_nll(texts, max_length=max_length, stride=stride).perplexity


def _cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding ``cache``'s batch rows ``rows`` (repeats allowed), leaving ``cache`` as it was.

    The layers are copied without their tensors (selecting rows makes new ones), so a batch of
    continuations does not pay for a copy of every context's cache.
    """
    layers = getattr(cache, "layers", ())
    shared = {id(v): v for layer in layers for v in vars(layer).values() if isinstance(v, torch.Tensor)}
    selected = copy.deepcopy(cache, shared)
    selected.batch_select_indices(rows.to(next(iter(shared.values())).device) if shared else rows)
    return selected


def _attention_window(model: Any) -> int | None:
    """The sliding attention window of the model's local layers, or None when every layer sees everything."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def _model_max_length(model: Any) -> int:
    config = model.config
    for field_name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, field_name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _leading_special_tokens(tokenizer: Any) -> list[int]:
    """The token ids the tokenizer puts before every text by default (e.g. ``[bos]``), found empirically.

    Tokenizers disagree on whether they add a BOS token (Llama and Gemma do, GPT-2 does not), and the model
    was trained with whatever its tokenizer does; asking the tokenizer is more reliable than a flag.
    """
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
