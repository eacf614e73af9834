"""EAVSS ingredients kept per answer, so EAVSS can be recomputed for any labelling or subset without a model.

:func:`~avss.hallucination.scoring.score_eavss` streams one total per answer kind; the questions that test the
ranking (a label-permutation null, a bootstrap over questions, one ranking per cross-validation fold) need the
same statistics split finer. Here every answer (one row) keeps its own per-layer mergeable sums, the ones
:mod:`avss.stats.accumulators` folds: the number of values, their mean and M2, the near-zero count at the
chosen threshold, and the pooled-variance sum. No activation is kept: a row is a few float64 numbers per
layer.

Any weighting of the rows (truthful/hallucinated labels, bootstrap multiplicities, a fold's questions) then
gives both classes' totals exactly as if those answers had been streamed together, by Chan's merge written
for weights (:meth:`AnswerStats.measures`), and EAVSS follows from
:func:`~avss.hallucination.eavss.eavss_scores`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avss.adapters import LayerAdapter, block_input, first_tensor, get_adapter
from avss.errors import NonFiniteActivationError
from avss.hallucination.batches import Encoded, collate, encode, pad_id
from avss.hallucination.eavss import EavssScores, eavss_scores
from avss.hallucination.folds import question_key
from avss.hallucination.pairs import Pair
from avss.hallucination.scoring import EavssOptions
from avss.io import atomic_write
from avss.progress import track
from avss.scorers.avss import sparsity
from avss.stats.accumulators import ACCUMULATOR_DTYPE, SiteBatch, Threshold, reduce_site
from avss.stats.collect import MODEL_INPUTS, execution_device

# The per-layer (R, L) sums of every row, in the order they are saved.
_SUMS = ("count", "mean", "m2", "near_zero", "pooled_sum", "pooled_count")


@dataclass
class AnswerStats:
    """Per-answer, per-layer statistics of one site: row ``r`` is one answer to question ``questions[r]``,
    truthful where ``truthful[r]``. The sums are float64 tensors of shape (rows, layers); ``options`` are the
    :class:`~avss.hallucination.scoring.EavssOptions` they were measured and are scored with."""

    questions: tuple[str, ...]
    truthful: torch.Tensor
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    near_zero: torch.Tensor
    pooled_sum: torch.Tensor
    pooled_count: torch.Tensor
    options: dict[str, Any] = field(default_factory=lambda: asdict(EavssOptions()))

    @property
    def num_rows(self) -> int:
        return len(self.questions)

    @property
    def num_layers(self) -> int:
        return int(self.count.shape[1])

    def groups(self) -> torch.Tensor:
        """(R,) index of each row's question, numbered in order of first appearance."""
        index: dict[str, int] = {}
        return torch.tensor([index.setdefault(q, len(index)) for q in self.questions], dtype=torch.long)

    def select(self, questions: Collection[str]) -> AnswerStats:
        """The rows of ``questions`` only (e.g. one fold's training questions), matched by stripped text."""
        wanted = {question_key(q) for q in questions}
        keep = torch.tensor([q in wanted for q in self.questions], dtype=torch.bool)
        return AnswerStats(
            tuple(q for q, kept in zip(self.questions, keep.tolist(), strict=True) if kept),
            self.truthful[keep],
            *(getattr(self, name)[keep] for name in _SUMS),
            options=dict(self.options),
        )

    def measures(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Variance and sparsity per layer of the rows weighted by ``weights`` (P, R): (P, L) each.

        A weight ``w`` counts the row ``w`` times, so 0/1 weights select a class and bootstrap multiplicities
        resample. M2 is merged around the all-rows mean ``c``: ``sum w (M2_r + n_r (m_r - c)^2) -
        N (mean - c)^2``, which is Chan's merge for integer weights and keeps the float64 cancellation small.
        """
        weights = weights.to(ACCUMULATOR_DTYPE)
        centre = (self.count * self.mean).sum(0) / self.count.sum(0).clamp_min(1)
        offset = self.mean - centre
        total = weights @ self.count
        first = weights @ (self.count * offset)
        second = weights @ (self.count * offset.square())
        m2 = weights @ self.m2 + second - first.square() / total.clamp_min(1)
        if self.options["variance"] == "pooled":
            variance = (weights @ self.pooled_sum) / (weights @ self.pooled_count).clamp_min(1)
        else:
            variance = m2.clamp_min(0) / total.clamp_min(1)
        spars, _ = sparsity(weights @ self.near_zero, total)
        return variance, spars

    def eavss_many(self, truthful: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(P, L) unnormalized EAVSS for ``P`` labellings ``truthful`` (P, R) bool of the rows, each row also
        weighted by ``weights`` (P, R) when given (bootstrap)."""
        labels = truthful.to(ACCUMULATOR_DTYPE)
        base = torch.ones_like(labels) if weights is None else weights.to(ACCUMULATOR_DTYPE)
        variance, spars = self.measures(torch.cat([base * labels, base * (1 - labels)]))
        count = len(labels)
        how = self.options["combine"]
        return torch.stack(
            [
                eavss_scores(variance[p], variance[count + p], spars[p], spars[count + p], how).eavss
                for p in range(count)
            ]
        )

    def scores(self) -> EavssScores:
        """EAVSS of the real labels: what :func:`~avss.hallucination.scoring.score_eavss` gives on the same
        answers."""
        labels = self.truthful.to(ACCUMULATOR_DTYPE).unsqueeze(0)
        variance, spars = self.measures(torch.cat([labels, 1 - labels]))
        return eavss_scores(
            variance[0], variance[1], spars[0], spars[1], self.options["combine"], options=dict(self.options)
        )

    def save(self, path: str | Path) -> Path:
        """``torch.save`` of plain tensors, strings and numbers (reloads with ``weights_only=True``)."""
        state = {name: getattr(self, name) for name in ("truthful", *_SUMS)}
        state |= {"questions": list(self.questions), "options": self.options}
        atomic_write(Path(path), lambda tmp: torch.save(state, tmp))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> AnswerStats:
        state = torch.load(path, weights_only=True)
        state["questions"] = tuple(state["questions"])
        return cls(**{f.name: state[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class AnswerRow:
    """One answer to measure: its question's key, its label and its tokens."""

    question: str
    truthful: bool
    encoded: Encoded


def answer_rows(tokenizer: Any, pairs: Sequence[Pair], options: EavssOptions) -> list[AnswerRow]:
    """Every pair's truthful answer, then up to ``options.max_hallucinated`` hallucinated ones, encoded as
    :func:`~avss.hallucination.batches.answer_batches` encodes them."""
    rows = []
    for pair in pairs:
        answers = [(True, pair.truthful)] + [
            (False, a) for a in pair.hallucinated[: options.max_hallucinated]
        ]
        for truthful, answer in answers:
            encoded = encode(tokenizer, pair.prompt, answer, options.max_length)
            rows.append(AnswerRow(question_key(pair.question), truthful, encoded))
    return rows


def _per_row(hidden: torch.Tensor, mask: torch.Tensor, thresholds: tuple[Threshold, ...]) -> SiteBatch:
    """The :func:`~avss.stats.accumulators.reduce_site` reduction of each row on its own: fields of shape
    (B,)."""
    if hidden.dim() == 2 and hidden.shape[0] == mask.numel():
        hidden = hidden.view(*mask.shape, -1)  # OPT flattens (B, T) inside its MLP
    mask = mask.to(hidden.device)
    reduced = [reduce_site(hidden[r : r + 1], mask[r : r + 1], thresholds)[0] for r in range(len(mask))]
    return SiteBatch.stack(reduced, hidden.device)


@torch.no_grad()
def collect_answer_stats(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    options: EavssOptions | None = None,
    progress: bool = True,
) -> AnswerStats:
    """Stream every answer of ``pairs`` through ``model`` once and keep its own statistics at
    ``options.site`` (one forward pass per batch, one reduction per answer and layer)."""
    options = options or EavssOptions()
    adapter = get_adapter(model)
    device = execution_device(model)
    thresholds = (Threshold.parse(options.threshold),)
    rows = answer_rows(tokenizer, pairs, options)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].encoded.ids))
    sums = {name: torch.zeros(len(rows), adapter.num_layers, dtype=ACCUMULATOR_DTYPE) for name in _SUMS}
    staged: dict[int, SiteBatch] = {}
    current: dict[str, torch.Tensor] = {}

    def reduce(layer: int, hidden: torch.Tensor) -> None:
        staged[layer] = _per_row(hidden, current["mask"], thresholds)

    hooks = _site_hooks(adapter, options.site, reduce)
    try:
        starts = range(0, len(order), options.batch_size)
        for start in track(starts, "collecting answer statistics", enabled=progress):
            index = order[start : start + options.batch_size]
            batch = collate([rows[r].encoded for r in index], pad_id(tokenizer))
            current["mask"] = batch["stat_mask"].to(device)
            model.base_model(**{key: batch[key].to(device) for key in MODEL_INPUTS if key in batch})
            for name in _SUMS:
                per_layer = [getattr(staged[layer], name) for layer in range(adapter.num_layers)]
                # near_zero has one column per threshold: the one threshold measured here
                per_layer = [value[:, 0] if value.dim() == 2 else value for value in per_layer]
                sums[name][index] = torch.stack(per_layer, dim=1).cpu()
            staged.clear()
    finally:
        for handle in hooks:
            handle.remove()
    if not (torch.isfinite(sums["mean"]).all() and torch.isfinite(sums["m2"]).all()):
        raise NonFiniteActivationError(
            "NaN/Inf activations on answer tokens; check the weights or use float32"
        )
    return AnswerStats(
        tuple(row.question for row in rows),
        torch.tensor([row.truthful for row in rows], dtype=torch.bool),
        **sums,
        options=asdict(options),
    )


def _site_hooks(adapter: LayerAdapter, site: str, reduce: Callable[[int, torch.Tensor], None]) -> list[Any]:
    """Hooks handing each layer's ``site`` activation to ``reduce``, read where
    :class:`~avss.stats.collect.StatisticsCollector` reads it: a block's or attention's output, the MLP down
    projection's input, or a block's output minus its input (``delta``)."""
    handles = []
    for layer, block in enumerate(adapter.blocks):
        module = adapter.site_module(layer, site)
        if site == "mlp":
            handles.append(module.register_forward_pre_hook(_input_hook(layer, reduce)))
        elif site == "delta":
            inputs: dict[str, torch.Tensor] = {}
            handles.append(block.register_forward_pre_hook(_keep_input(inputs), with_kwargs=True))
            handles.append(block.register_forward_hook(_output_hook(layer, reduce, inputs)))
        else:
            handles.append(module.register_forward_hook(_output_hook(layer, reduce)))
    return handles


def _input_hook(layer: int, reduce: Callable[[int, torch.Tensor], None]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        reduce(layer, args[0])

    return hook


def _keep_input(inputs: dict[str, torch.Tensor]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs["before"] = block_input(args, kwargs)

    return hook


def _output_hook(
    layer: int, reduce: Callable[[int, torch.Tensor], None], inputs: dict[str, torch.Tensor] | None = None
) -> Callable[..., None]:
    """``reduce`` the module's output, less the block's input when ``inputs`` holds it (``delta``)."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hidden = first_tensor(output)
        if inputs is not None:
            hidden = hidden - inputs.pop("before").to(hidden.device)
        reduce(layer, hidden)

    return hook
