"""Forward hooks that stream activation statistics out of any supported model.

``with StatisticsCollector(model, sites=...) as collector: collector.observe(batch)`` attaches hooks to every
block, reduces each activation on its own device into :mod:`avss.stats` accumulators, and always removes the
hooks, even when a batch raises. Only real tokens count: the batch's ``stat_mask`` (e.g. answer tokens for
EAVSS) or else its ``attention_mask`` selects them. No activation outlives its hook call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from avss.adapters import SITES, LayerAdapter, block_input, first_tensor, get_adapter
from avss.errors import NonFiniteActivationError
from avss.progress import track
from avss.stats import ActivationStats, Threshold

DEFAULT_THRESHOLDS = ("abs:1e-5", "rel:0.01")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last selected position in each row of a (B, T) boolean mask (0 for empty rows)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)


class StatisticsCollector:
    """Attach statistic hooks to a model's blocks; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        sites: Iterable[str] = ("block",),
        thresholds: Iterable[str] = DEFAULT_THRESHOLDS,
        relations: bool = True,
        stats: ActivationStats | None = None,
    ):
        self.model = model
        self.adapter: LayerAdapter = get_adapter(model)
        self.sites = tuple(dict.fromkeys(sites))
        unknown = [site for site in self.sites if site not in SITES]
        if unknown:
            raise ValueError(f"unknown site(s) {', '.join(unknown)}; choose from {', '.join(SITES)}")
        self.thresholds = tuple(Threshold.parse(t) for t in thresholds)
        self.relations = relations
        self.device = next(model.parameters()).device
        if stats is None:
            stats = ActivationStats.empty(self.adapter.num_layers, self.sites, self.thresholds)
        self.stats = stats.to(self.device)
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._last_tokens: dict[int, torch.Tensor] = {}

    def __enter__(self) -> StatisticsCollector:
        needs_input = self.relations or "delta" in self.sites
        for layer, block in enumerate(self.adapter.blocks):
            if needs_input:
                self._handles.append(block.register_forward_pre_hook(self._block_pre_hook(layer), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._block_hook(layer)))
            if "mlp" in self.sites:
                module = self.adapter.site_module(layer, "mlp")
                self._handles.append(module.register_forward_pre_hook(self._mlp_hook(layer)))
            if "attn" in self.sites:
                module = self.adapter.site_module(layer, "attn")
                self._handles.append(module.register_forward_hook(self._attn_hook(layer)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._last_tokens.clear()

    def _real(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._mask is not None, "observe() sets the token mask before the forward pass"
        mask = self._mask.to(hidden.device)
        return hidden[mask], mask

    def _update_site(self, site: str, layer: int, hidden: torch.Tensor) -> None:
        if hidden.dim() == 2 and self._mask is not None and hidden.shape[0] == self._mask.numel():
            hidden = hidden.view(*self._mask.shape, -1)  # OPT flattens (B, T) inside its MLP
        tokens, mask = self._real(hidden)
        self.stats.sites[site].update(layer, tokens, hidden, mask)

    def _block_pre_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._inputs[layer] = block_input(args, kwargs)

        return hook

    def _block_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            hidden = first_tensor(output)
            before = self._inputs.pop(layer, None)
            if "block" in self.sites:
                self._update_site("block", layer, hidden)
            if "delta" in self.sites:
                assert before is not None
                self._update_site("delta", layer, hidden - before.to(hidden.device))
            if self.relations:
                assert before is not None and self._mask is not None
                tokens, mask = self._real(hidden)
                self.stats.relations.update_cosine(layer, before.to(hidden.device)[mask], tokens)
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                last = last_token_index(mask)
                if layer == 0:
                    self._last_tokens[-1] = before.to(hidden.device)[rows, last].to(self.device)
                self._last_tokens[layer] = hidden[rows, last].to(self.device)

        return hook

    def _mlp_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._update_site("mlp", layer, args[0])

        return hook

    def _attn_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._update_site("attn", layer, first_tensor(output))

        return hook

    @torch.no_grad()
    def observe(self, batch: dict[str, torch.Tensor]) -> None:
        """Run one batch through the model body (no LM head) and fold its statistics in."""
        if not self._handles:
            raise RuntimeError("use StatisticsCollector as a context manager before calling observe()")
        mask = batch.get("stat_mask", batch["attention_mask"])
        self._mask = mask.to(self.device).bool()
        inputs = {key: batch[key].to(self.device) for key in MODEL_INPUTS if key in batch}
        try:
            self.model.base_model(**inputs)
        finally:
            self._inputs.clear()
        if self.relations:
            depths = [self._last_tokens[-1]] + [self._last_tokens[i] for i in range(self.adapter.num_layers)]
            self.stats.relations.update_angular(torch.stack(depths))
            self._last_tokens.clear()
        self.stats.num_sequences += int(inputs["input_ids"].shape[0])


def check_finite(stats: ActivationStats, adapter: LayerAdapter) -> None:
    """Raise :class:`NonFiniteActivationError` naming the first layer whose activations had NaN or Inf."""
    for site, site_stats in stats.sites.items():
        bad = ~(torch.isfinite(site_stats.mean) & torch.isfinite(site_stats.m2))
        if bad.any():
            layer = int(bad.nonzero()[0, 0])
            raise NonFiniteActivationError(
                f"layer {layer} ({adapter.layer_name(layer, site)}) produced NaN/Inf activations at site "
                f"{site!r}; check the weights or use --dtype float32"
            )


def collect_statistics(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    sites: Iterable[str] = ("block",),
    thresholds: Iterable[str] = DEFAULT_THRESHOLDS,
    relations: bool = True,
    stats: ActivationStats | None = None,
    progress: bool = True,
    on_batch: Callable[[ActivationStats, int], None] | None = None,
) -> ActivationStats:
    """Stream ``batches`` through ``model`` and return the merged statistics (on CPU).

    ``stats`` continues an earlier partial pass (resume); ``on_batch(stats, index)`` is called after each
    batch, e.g. to checkpoint.
    """
    batches = list(batches)
    with StatisticsCollector(model, sites, thresholds, relations, stats) as collector:
        for index, batch in enumerate(track(batches, "collecting statistics", enabled=progress)):
            collector.observe(batch)
            if on_batch is not None:
                on_batch(collector.stats, index)
    result = collector.stats.to("cpu")
    check_finite(result, collector.adapter)
    return result
