"""ITI-style mean-difference steering: a training-free peer for the mitigation arms.

Inference-time intervention (Li et al., 2023) shifts activations along a "truthful" direction. Its simplest
form, the mass-mean shift, is used here at whole blocks: at each chosen layer ``l``,

    h_l  <-  h_l + alpha x (mean_T(h_l) - mean_H(h_l))

on every position, where the means run over the answer tokens of truthful (T) and hallucinated (H) training
answers. The means come from streamed float64 sums (:class:`MeanActivations`, mergeable, so per-fold sums
collected once give any fold's training direction by merging the others); no activation is kept. The
strength ``alpha`` is the one knob, to be tuned on validation questions (:func:`choose_strength`, within a
bound on the loss of held-out prose); ``alpha = 0`` is the base model.

The shift is a forward hook on the block output, found through the architecture table
(:func:`avss.adapters.get_adapter`), applied inside :func:`steering`, so any evaluation
(:func:`avss.evaluation.evaluate`, :func:`~avss.hallucination.heldout.evaluate_heldout`) scores the steered
model unchanged and the hooks are gone afterwards, even when the evaluation raises. (Transformers 5 records
``output_hidden_states`` with its own earlier hooks: the steered block's own entry there is unshifted, while
every later block, the logits and generation see the shift.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from avss.adapters import first_tensor, get_adapter
from avss.hallucination.batches import answer_batches
from avss.hallucination.pairs import Pair
from avss.progress import track
from avss.stats.accumulators import ACCUMULATOR_DTYPE
from avss.stats.collect import MODEL_INPUTS, execution_device


@dataclass
class MeanActivations:
    """Per-layer sums (L, D) and token counts (L,) of block outputs over T and H answer tokens, float64."""

    truthful_sum: torch.Tensor
    truthful_count: torch.Tensor
    hallucinated_sum: torch.Tensor
    hallucinated_count: torch.Tensor

    def merge(self, other: MeanActivations) -> MeanActivations:
        """The sums of both sets of answers (e.g. the training folds of one test fold)."""
        return MeanActivations(
            self.truthful_sum + other.truthful_sum,
            self.truthful_count + other.truthful_count,
            self.hallucinated_sum + other.hallucinated_sum,
            self.hallucinated_count + other.hallucinated_count,
        )

    def direction(self, layer: int) -> torch.Tensor:
        """(D,) ``mean_T - mean_H`` of block ``layer``'s output."""
        if self.truthful_count[layer] == 0 or self.hallucinated_count[layer] == 0:
            raise ValueError(f"layer {layer} has no truthful or no hallucinated answer tokens")
        truthful = self.truthful_sum[layer] / self.truthful_count[layer]
        return truthful - self.hallucinated_sum[layer] / self.hallucinated_count[layer]

    def directions(self, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        return {layer: self.direction(layer) for layer in layers}


def merge_all(parts: Sequence[MeanActivations]) -> MeanActivations:
    """One :class:`MeanActivations` of several (at least one)."""
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged


def collect_mean_activations(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    max_length: int = 128,
    batch_size: int = 8,
    max_hallucinated: int | None = 3,
    progress: bool = True,
) -> MeanActivations:
    """Stream the T and H answers of ``pairs`` (batched as EAVSS batches them) and sum every block's output
    over their answer tokens."""
    totals: list[torch.Tensor] = []
    for kind in ("truthful", "hallucinated"):
        batches = answer_batches(
            tokenizer,
            pairs,
            kind,
            max_length=max_length,
            batch_size=batch_size,
            max_hallucinated=max_hallucinated,
        )
        if not batches:
            raise ValueError(f"no {kind} answers to average")
        totals += answer_token_sums(model, track(batches, f"mean activations ({kind})", enabled=progress))
    return MeanActivations(*totals)


@torch.no_grad()
def answer_token_sums(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer float64 sums (L, D) of block outputs over each batch's ``stat_mask`` tokens, and their
    number (L,)."""
    adapter = get_adapter(model)
    device = execution_device(model)
    sums = torch.zeros(adapter.num_layers, hidden_size(model), dtype=ACCUMULATOR_DTYPE)
    counts = torch.zeros(adapter.num_layers, dtype=ACCUMULATOR_DTYPE)
    current: dict[str, torch.Tensor] = {}

    def accumulate(layer: int, hidden: torch.Tensor) -> None:
        weights = current["mask"].to(device=hidden.device, dtype=ACCUMULATOR_DTYPE)
        sums[layer] += torch.einsum("btd,bt->d", hidden.to(ACCUMULATOR_DTYPE), weights).cpu()
        counts[layer] += weights.sum().cpu()

    handles = [
        block.register_forward_hook(_reader(layer, accumulate)) for layer, block in enumerate(adapter.blocks)
    ]
    try:
        for batch in batches:
            current["mask"] = batch["stat_mask"]
            model.base_model(**{key: batch[key].to(device) for key in MODEL_INPUTS if key in batch})
    finally:
        for handle in handles:
            handle.remove()
    return sums, counts


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream (``hidden_size``, which configs alias: GPT-2's ``n_embd``, ...)."""
    return int(model.config.hidden_size)


def _reader(layer: int, accumulate: Callable[[int, torch.Tensor], None]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        accumulate(layer, first_tensor(output))

    return hook


def _shifter(shift: torch.Tensor) -> Callable[..., Any]:
    """A forward hook returning the block's output with ``shift`` added to its hidden state (every position);
    the shift is cast once per device and dtype the block runs in."""
    cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = first_tensor(output)
        key = (hidden.device, hidden.dtype)
        if key not in cast:
            cast[key] = shift.to(device=hidden.device, dtype=hidden.dtype)
        steered = hidden + cast[key]
        if isinstance(output, torch.Tensor):
            return steered
        if isinstance(output, tuple):
            return (steered, *output[1:])
        raise TypeError(f"cannot steer a block output of type {type(output).__name__}")

    return hook


@contextlib.contextmanager
def steering(model: nn.Module, directions: Mapping[int, torch.Tensor], alpha: float) -> Iterator[nn.Module]:
    """Inside the block, block ``l`` of ``model`` adds ``alpha * directions[l]`` to its output; yields the
    model. Layers must exist and directions match the hidden size (checked before any hook is attached)."""
    adapter = get_adapter(model)
    width = hidden_size(model)
    for layer, direction in directions.items():
        if not 0 <= layer < adapter.num_layers:
            raise ValueError(f"steering layer {layer} is not in 0..{adapter.num_layers - 1}")
        if direction.shape != (width,):
            raise ValueError(
                f"the direction of layer {layer} has shape {tuple(direction.shape)}, not ({width},)"
            )
    handles = [
        adapter.blocks[layer].register_forward_hook(_shifter(alpha * direction.to(ACCUMULATOR_DTYPE)))
        for layer, direction in directions.items()
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class StrengthPoint:
    """One steering strength measured on validation data: the truthful-vs-hallucinated pair accuracy it
    gives, and the mean NLL (nats per token) of held-out prose under it."""

    pair_accuracy: float
    prose_nll: float


def choose_strength(curve: Mapping[float, StrengthPoint], max_nll_rise: float) -> float:
    """The strength with the highest validation pair accuracy among those that raise the held-out prose NLL
    by at most ``max_nll_rise`` over strength 0 (ties: the weaker strength).

    Pair accuracy alone rewards wrecking the model: a shift large enough to make every answer improbable can
    still order truthful above hallucinated answers. ITI tunes its strength on truthfulness times
    informativeness for the same reason; a bound on general language-modelling loss is its multiple-choice
    counterpart. ``curve`` must hold strength 0, which is always allowed.
    """
    if 0.0 not in curve:
        raise ValueError("the strength curve must include 0 (the unsteered model)")
    unsteered = curve[0.0].prose_nll
    allowed = [alpha for alpha, point in curve.items() if point.prose_nll - unsteered <= max_nll_rise]
    return max(allowed, key=lambda alpha: (curve[alpha].pair_accuracy, -alpha))
