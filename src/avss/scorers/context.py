"""Calibration data bound to a model: the one place scorers get activations and losses from.

Every hook-based scorer reads the same :class:`~avss.stats.accumulators.ActivationStats`, computed by one
streaming pass per model state (AVSS, block influence and angular distance come out of the same forward pass),
and the loss-based scorer asks for the calibration NLL with a block skipped.

Two implementations answer the same questions:

* :class:`ScoringContext` recomputes from the embeddings every time (the reference);
* :class:`CachedContext` keeps the residual stream entering every block on CPU. After a block is removed, only
  the blocks from the removal point on are re-run (the earlier blocks see the same inputs as before, so their
  statistics and outputs are reused), and skipping block ``l`` for the leave-one-out loss runs only the blocks
  after it. This is what makes iterative pruning and ``loo_nll`` affordable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avss.adapters import (
    LayerAdapter,
    block_input,
    first_tensor,
    get_adapter,
    hooks,
    replace_input,
    suffix_view,
)
from avss.progress import track
from avss.stats.accumulators import ActivationStats, RelationStats, SiteStats, SublayerStats
from avss.stats.collect import (
    DEFAULT_THRESHOLDS,
    StatisticsCollector,
    check_finite,
    collect_statistics,
    last_token_index,
)

Batch = dict[str, torch.Tensor]


def token_mask(batch: Batch) -> torch.Tensor:
    """The tokens statistics and losses count: ``stat_mask`` if the batch has one, else the attention mask."""
    return batch.get("stat_mask", batch["attention_mask"]).bool()


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` of a block with its hidden state replaced (blocks return a tensor or a tuple)."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def nll_sum(model: nn.Module, hidden: torch.Tensor, batch: Batch) -> tuple[float, int]:
    """Summed next-token NLL (nats) and token count from the final hidden states (after the final norm).

    The LM head is applied one sequence at a time so vocabularies of 262k entries (Gemma 3) do not need a
    (B, T, V) logits tensor.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    mask = token_mask(batch).to(hidden.device)
    targets = batch["input_ids"].to(hidden.device)
    total, count = 0.0, 0
    for row in range(hidden.shape[0]):
        keep = mask[row, 1:] & mask[row, :-1]
        if not keep.any():
            continue
        logits = head(hidden[row, :-1][keep]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += float(F.cross_entropy(logits, targets[row, 1:][keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


def body_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {key: batch[key].to(device) for key in ("input_ids", "attention_mask") if key in batch}


class ScoringContext:
    """Calibration batches bound to a model; statistics are computed once per model state.

    ``sublayers`` adds each block's attention and MLP similarities to the statistics
    (:class:`~avss.stats.accumulators.SublayerStats`).

    Call :meth:`removed` after removing a block from the model so the next question is answered for the
    pruned model.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        sites: Iterable[str] = ("block",),
        thresholds: Iterable[str] = DEFAULT_THRESHOLDS,
        progress: bool = False,
        sublayers: bool = False,
    ):
        self.model = model
        self.batches = list(batches)
        self.sites = tuple(dict.fromkeys(sites)) or ("block",)
        self.thresholds = tuple(dict.fromkeys(thresholds))
        self.progress = progress
        self.sublayers = sublayers
        self.device = next(model.parameters()).device
        self._stats: ActivationStats | None = None
        self._base_nll: dict[int | None, float] = {}  # by ``batches`` (None: every batch)

    @property
    def adapter(self) -> LayerAdapter:
        return get_adapter(self.model)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def statistics(self) -> ActivationStats:
        """Site and relation statistics of every layer (the shared streaming pass)."""
        if self._stats is None:
            self._stats = collect_statistics(
                self.model,
                self.batches,
                sites=self.sites,
                thresholds=self.thresholds,
                progress=self.progress,
                sublayers=self.sublayers,
            )
        return self._stats

    def base_nll(self, batches: int | None = None) -> float:
        """Mean next-token NLL of the calibration tokens (of the first ``batches`` batches) under the current
        model."""
        if batches not in self._base_nll:
            self._base_nll[batches] = self.nll_without(None, batches)
        return self._base_nll[batches]

    @torch.no_grad()
    def nll_without(self, layer: int | None, batches: int | None = None) -> float:
        """Mean calibration NLL with block ``layer`` skipped (its output replaced by its input), over the
        first ``batches`` calibration batches (None: all of them)."""
        handles = []
        if layer is not None:

            def skip(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
                return with_hidden(output, block_input(args, kwargs))

            handles.append(self.adapter.blocks[layer].register_forward_hook(skip, with_kwargs=True))
        total, count = 0.0, 0
        with hooks(*handles):
            for batch in self.batches[:batches]:
                out = self.model.base_model(**body_inputs(batch, self.device), use_cache=False)
                batch_total, batch_count = nll_sum(self.model, first_tensor(out), batch)
                total, count = total + batch_total, count + batch_count
        return total / max(count, 1)

    def removed(self, layer: int) -> None:
        """The model's block ``layer`` was removed: forget everything measured on the old model."""
        self._stats = None
        self._base_nll = {}


class CachedContext(ScoringContext):
    """:class:`ScoringContext` that caches the residual stream entering every block (on CPU).

    ``states[b][d]`` is the input of block ``d`` for batch ``b`` (``d = L`` is the last block's output). After
    block ``r`` is removed, states ``0..r`` and the statistics of layers ``< r`` stay valid; the next question
    re-runs blocks ``r:`` only, starting from the cached state ``r``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.states: list[list[torch.Tensor]] = [[] for _ in self.batches]
        self._valid_from = 0  # layers >= this need their statistics (and later states) recomputed
        self._site_stats: ActivationStats | None = None
        self.blocks_run = 0  # block forward passes spent, per batch (for benchmarks)

    def statistics(self) -> ActivationStats:
        if self._stats is None:
            self._refresh()
            self._stats = self._combine()
        return self._stats

    @torch.no_grad()
    def _refresh(self) -> None:
        """Re-run blocks ``valid_from:`` from the cached state, updating states and site statistics."""
        start, num_layers = self._valid_from, self.num_layers
        if start >= num_layers and self._site_stats is not None:
            return
        blocks = list(self.adapter.blocks)
        collector = StatisticsCollector(
            self.model, self.sites, self.thresholds, relations=False, sublayers=self.sublayers
        )
        with collector:
            for index, batch in enumerate(track(self.batches, "re-scoring", enabled=self.progress)):
                states = self.states[index][: start + 1]
                captured: dict[int, torch.Tensor] = {}
                handles = [
                    self._capture(block, depth, captured)
                    for depth, block in enumerate(blocks)
                    if depth >= start
                ]
                handles.append(self._capture_output(blocks[-1], num_layers, captured))
                if start > 0:
                    handles.append(self._inject(blocks[start], states[start]))
                with hooks(*handles), suffix_view(self.adapter, start):
                    collector.observe(batch)
                self.states[index] = states[:start] + [captured[d] for d in range(start, num_layers + 1)]
        self.blocks_run += num_layers - start
        fresh = collector.stats.to("cpu")
        check_finite(fresh, self.adapter)
        self._site_stats = fresh if self._site_stats is None else splice(self._site_stats, fresh, start)
        self._valid_from = num_layers

    def _capture(self, block: nn.Module, depth: int, captured: dict[int, torch.Tensor]) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[depth] = block_input(args, kwargs).detach().to("cpu")

        return block.register_forward_pre_hook(hook, with_kwargs=True)

    def _capture_output(self, block: nn.Module, depth: int, captured: dict[int, torch.Tensor]) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured[depth] = first_tensor(output).detach().to("cpu")

        return block.register_forward_hook(hook)

    def _inject(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        """A pre-hook feeding the cached state to ``block``; prepended so the statistics hooks see it too."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return replace_input(args, kwargs, hidden.to(self.device))

        return block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)

    def _combine(self) -> ActivationStats:
        """Cached site statistics plus relation statistics recomputed from the cached states (no model)."""
        assert self._site_stats is not None
        relations = RelationStats(self.num_layers)
        for batch, states in zip(self.batches, self.states, strict=True):
            mask = token_mask(batch)
            for layer in range(self.num_layers):
                relations.update_cosine(layer, states[layer][mask], states[layer + 1][mask])
            rows = torch.arange(mask.shape[0])
            last = last_token_index(mask)
            relations.update_angular(torch.stack([state[rows, last] for state in states]))
        return ActivationStats(
            sites=self._site_stats.sites,
            relations=relations,
            num_sequences=self._site_stats.num_sequences,
            meta=dict(self._site_stats.meta),
            sublayers=self._site_stats.sublayers,
        )

    @torch.no_grad()
    def nll_without(self, layer: int | None, batches: int | None = None) -> float:
        """Mean calibration NLL with block ``layer`` skipped, running only the blocks after it, over the first
        ``batches`` calibration batches (None: all of them).

        The skipped block's output is replaced by its cached input (``layer=None``: the last block's output by
        the cached final state), so the model's own final norm and head produce the logits.
        """
        self._refresh()
        num_layers = self.num_layers
        start = num_layers - 1 if layer is None else layer
        block = self.adapter.blocks[start]
        total, count = 0.0, 0
        for batch, states in zip(self.batches[:batches], self.states[:batches], strict=True):
            replacement = states[num_layers if layer is None else layer].to(self.device)

            def swap(module: nn.Module, args: tuple, output: Any, hidden: torch.Tensor = replacement) -> Any:
                return with_hidden(output, hidden)

            with hooks(block.register_forward_hook(swap)), suffix_view(self.adapter, start):
                out = self.model.base_model(**body_inputs(batch, self.device), use_cache=False)
            batch_total, batch_count = nll_sum(self.model, first_tensor(out), batch)
            total, count = total + batch_total, count + batch_count
        self.blocks_run += num_layers - start
        return total / max(count, 1)

    def removed(self, layer: int) -> None:
        """Keep the states entering blocks ``0..layer`` and the statistics of layers before ``layer``."""
        super().removed(layer)
        self.states = [states[: layer + 1] for states in self.states]
        self._valid_from = min(self._valid_from, layer)
        if self._site_stats is not None:
            self._site_stats = truncate(self._site_stats, layer, self.num_layers)


def truncate(stats: ActivationStats, keep: int, num_layers: int) -> ActivationStats:
    """Statistics of layers ``< keep`` re-shaped for a ``num_layers``-layer model (later layers zeroed)."""
    sites = {}
    for name, site in stats.sites.items():
        fresh = SiteStats(num_layers, site.thresholds)
        tensors = {
            key: torch.cat([value[:keep], fresh.tensors()[key][keep:]])
            for key, value in site.tensors().items()
        }
        sites[name] = SiteStats(num_layers, site.thresholds, **tensors)
    sublayers = None
    if stats.sublayers is not None:
        zeros = SublayerStats(num_layers).tensors()
        sublayers = SublayerStats(
            num_layers,
            **{
                key: torch.cat([value[:keep], zeros[key][keep:]])
                for key, value in stats.sublayers.tensors().items()
            },
        )
    return ActivationStats(sites, RelationStats(num_layers), stats.num_sequences, dict(stats.meta), sublayers)


def splice(old: ActivationStats, fresh: ActivationStats, start: int) -> ActivationStats:
    """Site statistics of layers ``< start`` from ``old`` and of layers ``>= start`` from ``fresh``."""
    sites = {}
    for name, site in fresh.sites.items():
        before = old.sites[name].tensors()
        tensors = {
            key: torch.cat([before[key][:start], value[start:]]) for key, value in site.tensors().items()
        }
        sites[name] = SiteStats(site.num_layers, site.thresholds, **tensors)
    sublayers = None
    if fresh.sublayers is not None and old.sublayers is not None:
        before = old.sublayers.tensors()
        sublayers = SublayerStats(
            fresh.num_layers,
            **{
                key: torch.cat([before[key][:start], value[start:]])
                for key, value in fresh.sublayers.tensors().items()
            },
        )
    return ActivationStats(sites, fresh.relations, fresh.num_sequences, dict(fresh.meta), sublayers)


def context_for(
    model: nn.Module,
    batches: Iterable[Batch],
    scorers: Iterable[Any],
    cached: bool = True,
    progress: bool = False,
) -> ScoringContext:
    """A context measuring every site, threshold and sublayer similarity ``scorers`` need, so they all share
    one pass, over the calibration batches they read (all, unless every scorer reads only the first few:
    then the cached states and re-scoring passes of the others are not paid for)."""
    scorers = list(scorers)
    batches = list(batches)
    read = [scorer.batches_read() for scorer in scorers]
    if read and None not in read:
        batches = batches[: max(read)]
    sites = [site for scorer in scorers for site in scorer.sites()] or ["block"]
    thresholds = [*DEFAULT_THRESHOLDS, *(t for scorer in scorers for t in scorer.thresholds())]
    sublayers = any(scorer.needs_sublayers for scorer in scorers)
    kind = CachedContext if cached else ScoringContext
    return kind(model, batches, sites=sites, thresholds=thresholds, progress=progress, sublayers=sublayers)
