"""Forward hooks that stream activation statistics out of any supported model.

``with StatisticsCollector(model, sites=...) as collector: collector.observe(batch)`` attaches hooks to every
block, reduces each activation on its own device into :mod:`avss.stats.accumulators` accumulators, and always
removes the hooks, even when a batch raises. Only real tokens count: the batch's ``stat_mask`` (e.g. answer
tokens for EAVSS) or else its ``attention_mask`` selects them. No activation outlives its hook call (the
residual stream between a block's two sublayers lives until that block's output hook has reduced it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from avss.adapters import SITES, LayerAdapter, block_input, first_tensor, get_adapter
from avss.errors import NonFiniteActivationError
from avss.progress import track
from avss.stats.accumulators import (
    ACCUMULATOR_DTYPE,
    SUBLAYER_KINDS,
    ActivationStats,
    LinearFitStats,
    SiteBatch,
    Threshold,
    masked_cosine_sum,
    reduce_site,
)

DEFAULT_THRESHOLDS = ("abs:1e-5", "rel:0.01")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last selected position in each row of a (B, T) boolean mask (0 for empty rows)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs go and accumulators live: the first parameter that holds data.

    With ``device_map`` offloading (accelerate), offloaded weights sit on the ``meta`` device until their hook
    loads them, so "the first parameter's device" would send the inputs nowhere.
    """
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@functools.cache
def compiled_reductions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``torch.compile``d :func:`~avss.stats.accumulators.reduce_site` and
    :func:`~avss.stats.accumulators.masked_cosine_sum`.

    Eagerly, each reduction is a separate kernel that streams the whole activation from memory (upcast, sum,
    sum of squares, |x|, one comparison per threshold, pooling, the cosine dot product), so the statistics
    cost about ten memory passes per layer. Compiled, they fuse into a few kernels that read each activation
    once or twice (Triton on GPU, C++/OpenMP on CPU; needs a C++ compiler there). Shapes are dynamic, so
    batches of any length reuse one compilation; the first batch pays the compile time (about a minute on
    CPU, cached on disk by inductor afterwards).
    """
    return (
        torch.compile(reduce_site, dynamic=True),
        torch.compile(masked_cosine_sum, dynamic=True),
    )


class StatisticsCollector:
    """Attach statistic hooks to a model's blocks; see the module docstring.

    Each hook reduces its activation on the activation's own device (layers of a ``device_map`` model may sit
    on different GPUs) into a :class:`~avss.stats.accumulators.SiteBatch` and moves only those few numbers to
    the accumulators' device. After the forward pass the per-layer reductions are stacked and folded in with
    one vectorized Chan merge per site. Nothing is read back to the host, so GPU kernels never wait for
    Python.

    ``sublayers`` also measures each block's attention and MLP similarity
    (:class:`~avss.stats.accumulators.SublayerStats`): a pre-hook on the adapter's ``attn_residual`` module
    reads the stream between the two sublayers, and the block's output hook reduces both cosines.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Iterable[str] = ("block",),
        thresholds: Iterable[str] = DEFAULT_THRESHOLDS,
        relations: bool = True,
        stats: ActivationStats | None = None,
        compile: bool = False,
        sublayers: bool = False,
    ):
        self.model = model
        self.adapter: LayerAdapter = get_adapter(model)
        self.sites = tuple(dict.fromkeys(sites))
        unknown = [site for site in self.sites if site not in SITES]
        if unknown:
            raise ValueError(f"unknown site(s) {', '.join(unknown)}; choose from {', '.join(SITES)}")
        self.thresholds = tuple(Threshold.parse(t) for t in thresholds)
        self.relations = relations
        self.sublayers = sublayers
        if sublayers:
            self.adapter.sublayer_path("attn")  # refuses architectures without a stream between sublayers
        self.device = execution_device(model)
        if stats is None:
            stats = ActivationStats.empty(self.adapter.num_layers, self.sites, self.thresholds, sublayers)
        if sublayers and stats.sublayers is None:
            raise ValueError("the statistics to continue were measured without sublayer similarities")
        self.stats = stats.to(self.device)
        self._reduce_site, self._cosine_sum = (
            compiled_reductions() if compile else (reduce_site, masked_cosine_sum)
        )
        self._handles: list[Any] = []
        self._batch: _BatchState | None = None

    def __enter__(self) -> StatisticsCollector:
        needs_input = self.relations or self.sublayers or "delta" in self.sites
        for layer, block in enumerate(self.adapter.blocks):
            if needs_input:
                pre_hook = self._block_pre_hook(layer)
                self._handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if self.sublayers:
                module = self.adapter.attn_residual_module(layer)
                self._handles.append(module.register_forward_pre_hook(self._between_hook(layer)))
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
        self._batch = None

    @property
    def _state(self) -> _BatchState:
        assert self._batch is not None, "observe() sets up the batch before the forward pass"
        return self._batch

    def _update_site(self, site: str, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Reduce ``hidden`` for ``site`` and stage the result; returns the token norms for reuse."""
        state = self._state
        if hidden.dim() == 2 and hidden.shape[0] == state.mask.numel():
            hidden = hidden.view(*state.mask.shape, -1)  # OPT flattens (B, T) inside its MLP
        reduced, norms = self._reduce_site(hidden, state.mask_on(hidden.device), self.thresholds)
        state.sites[site][layer] = reduced
        return norms

    def _block_pre_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._state.inputs[layer] = block_input(args, kwargs)

        return hook

    def _block_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            state = self._state
            hidden = first_tensor(output)
            before = state.inputs.pop(layer, None)
            norms = self._update_site("block", layer, hidden) if "block" in self.sites else None
            if "delta" in self.sites:
                assert before is not None
                self._update_site("delta", layer, hidden - before.to(hidden.device))
            if self.sublayers:
                assert before is not None
                self._sublayer_cosines(layer, before, state.between.pop(layer), hidden, norms)
            if self.relations:
                assert before is not None
                before = before.to(hidden.device)
                mask = state.mask_on(hidden.device)
                state.cosines[layer] = self._cosine_sum(before, hidden, mask, state.norms_of(before), norms)
                last = state.last_on(hidden.device)
                if layer == 0:
                    state.last_tokens[-1] = before[last].to(self.device)
                state.last_tokens[layer] = hidden[last].to(self.device)
            state.remember(hidden, norms)

        return hook

    def _between_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._state.between[layer] = args[0]

        return hook

    def _sublayer_cosines(
        self,
        layer: int,
        before: torch.Tensor,
        between: torch.Tensor,
        after: torch.Tensor,
        after_norms: torch.Tensor | None,
    ) -> None:
        """Stage cos(x, x + attention) and cos(x + attention, block output) of block ``layer``'s tokens."""
        state = self._state
        device = between.device
        mask = state.mask_on(device)
        before_norms = state.norms_of(before)
        between_norms = torch.linalg.vector_norm(
            between.to(torch.promote_types(between.dtype, torch.float32)), dim=-1
        )
        attn = self._cosine_sum(before.to(device), between, mask, before_norms, between_norms)
        mlp = self._cosine_sum(between, after.to(device), mask, between_norms, after_norms)
        state.sublayer_cosines["attn"][layer] = attn
        state.sublayer_cosines["mlp"][layer] = mlp

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
        inputs = {key: batch[key].to(self.device) for key in MODEL_INPUTS if key in batch}
        self._batch = _BatchState(mask.to(self.device).bool(), self.sites)
        try:
            self.model.base_model(**inputs)
            self._fold(self._batch)
        finally:
            self._batch = None
        self.stats.num_sequences += int(inputs["input_ids"].shape[0])

    def _fold(self, state: _BatchState) -> None:
        """Fold the staged per-layer reductions in, one vectorized merge per site.

        Only the layers that ran are folded: a replay from cached hidden states (:mod:`avss.scorers`) runs a
        suffix of the blocks. Angular distances need every depth, so such a replay leaves them unchanged.
        """
        for site, staged in state.sites.items():
            ran = sorted(staged)
            if ran:
                batch = SiteBatch.stack([staged[layer] for layer in ran], self.device)
                self.stats.sites[site].fold(batch, self._subset(ran))
        if self.stats.sublayers is not None:
            for kind, staged_cosines in state.sublayer_cosines.items():
                ran = sorted(staged_cosines)
                if ran:
                    sums = torch.stack([staged_cosines[layer][0].to(self.device) for layer in ran])
                    counts = torch.stack([staged_cosines[layer][1].to(self.device) for layer in ran])
                    self.stats.sublayers.fold(kind, sums, counts, self._subset(ran))
        if not self.relations or not state.cosines:
            return
        ran = sorted(state.cosines)
        sums = torch.stack([state.cosines[layer][0].to(self.device) for layer in ran])
        counts = torch.stack([state.cosines[layer][1].to(self.device) for layer in ran])
        self.stats.relations.fold_cosine(sums, counts, self._subset(ran))
        if len(state.last_tokens) == self.stats.num_layers + 1:
            depths = [state.last_tokens[depth] for depth in range(-1, self.stats.num_layers)]
            self.stats.relations.update_angular(torch.stack(depths))

    def _subset(self, layers: list[int]) -> list[int] | None:
        return None if len(layers) == self.stats.num_layers else layers


class _BatchState:
    """Everything the hooks share during one forward pass, dropped as soon as the batch is folded in.

    Masks and last-token indices are moved to each device once (not once per layer), and the token norms of
    a block's output are kept so the next block, whose input is that very tensor, does not recompute them.
    """

    def __init__(self, mask: torch.Tensor, sites: tuple[str, ...]):
        self.mask = mask
        self.sites: dict[str, dict[int, SiteBatch]] = {site: {} for site in sites}
        self.inputs: dict[int, torch.Tensor] = {}
        self.cosines: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.between: dict[int, torch.Tensor] = {}  # the stream between each block's two sublayers
        self.sublayer_cosines: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {
            kind: {} for kind in SUBLAYER_KINDS
        }
        self.last_tokens: dict[int, torch.Tensor] = {}
        self._masks: dict[torch.device, torch.Tensor] = {mask.device: mask}
        self._last: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def mask_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            self._masks[device] = self.mask.to(device)
        return self._masks[device]

    def last_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, positions) indexing each sequence's last selected token on ``device``."""
        if device not in self._last:
            mask = self.mask_on(device)
            rows = torch.arange(mask.shape[0], device=device)
            self._last[device] = (rows, last_token_index(mask))
        return self._last[device]

    def remember(self, hidden: torch.Tensor, norms: torch.Tensor | None) -> None:
        self._previous = (hidden, norms) if norms is not None else None

    def norms_of(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._previous is not None and self._previous[0] is hidden:
            return self._previous[1]
        return None


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
    compile: bool = False,
    sublayers: bool = False,
) -> ActivationStats:
    """Stream ``batches`` through ``model`` and return the merged statistics (on CPU).

    ``stats`` continues an earlier partial pass (resume); ``on_batch(stats, index)`` is called after each
    batch, e.g. to checkpoint. ``compile`` fuses each layer's reductions with ``torch.compile`` (see
    :func:`compiled_reductions`). ``sublayers`` adds each block's attention and MLP similarities.
    """
    batches = list(batches)
    with StatisticsCollector(model, sites, thresholds, relations, stats, compile, sublayers) as collector:
        for index, batch in enumerate(track(batches, "collecting statistics", enabled=progress)):
            collector.observe(batch)
            if on_batch is not None:
                on_batch(collector.stats, index)
    result = collector.stats.to("cpu")
    check_finite(result, collector.adapter)
    return result


class _StopForward(Exception):
    """Raised by a hook once the deepest block a pass needs has run, to skip the rest of the model."""


class LinearFitCollector:
    """Hooks streaming the sums of one least-squares fit per ``(source, target)`` block pair.

    For each pair, the inputs are ``m``, the output of ``source``'s MLP down projection, and the targets are
    ``target``'s output minus ``source``'s residual stream before its MLP was added (``source``'s output
    minus ``m``): what ``--patch linear`` needs for a removed run ``source + 1 .. target``. Only real tokens
    count (``stat_mask``, else ``attention_mask``); the forward pass stops after the deepest target. The
    sums live on the model's execution device; hooks are always removed on exit.
    """

    def __init__(self, model: nn.Module, pairs: list[tuple[int, int]], width: int):
        self.model = model
        self.adapter = get_adapter(model)
        self.pairs = list(pairs)
        self.device = execution_device(model)
        self.stats = LinearFitStats(len(self.pairs), width).to(self.device)
        self.deepest = max(target for _, target in self.pairs)
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._captured: dict[tuple[str, int], torch.Tensor] = {}

    def __enter__(self) -> LinearFitCollector:
        for fit, (source, target) in enumerate(self.pairs):
            down = self.adapter.site_module(source, "mlp")
            self._handles.append(down.register_forward_hook(self._capture("mlp", source)))
            block = self.adapter.blocks[source]
            self._handles.append(block.register_forward_hook(self._capture("block", source)))
            self._handles.append(self.adapter.blocks[target].register_forward_hook(self._fit(fit)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def _capture(self, kind: str, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            assert self._mask is not None, "observe() sets the mask before the forward pass"
            hidden = first_tensor(output)
            if hidden.dim() == 2 and hidden.shape[0] == self._mask.numel():
                hidden = hidden.view(*self._mask.shape, -1)  # OPT flattens (B, T) inside its MLP
            self._captured[kind, layer] = hidden

        return hook

    def _fit(self, fit: int) -> Callable[..., None]:
        source, target = self.pairs[fit]

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            assert self._mask is not None
            produced = first_tensor(output)
            mlp = self._captured["mlp", source]
            before_mlp = self._captured["block", source].to(mlp.device, ACCUMULATOR_DTYPE) - mlp.double()
            wanted = produced.to(mlp.device, ACCUMULATOR_DTYPE) - before_mlp
            self.stats.update(fit, mlp, wanted, self._mask.to(mlp.device))
            if target == self.deepest:
                raise _StopForward

        return hook

    @torch.no_grad()
    def observe(self, batch: dict[str, torch.Tensor]) -> None:
        """Run one batch through the model body, up to the deepest target block, and add its sums."""
        if not self._handles:
            raise RuntimeError("use LinearFitCollector as a context manager before calling observe()")
        self._mask = batch.get("stat_mask", batch["attention_mask"]).to(self.device).bool()
        inputs = {key: batch[key].to(self.device) for key in MODEL_INPUTS if key in batch}
        try:
            self.model.base_model(**inputs)
        except _StopForward:
            pass
        finally:
            self._mask = None
            self._captured.clear()


def collect_linear_fit(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    pairs: list[tuple[int, int]],
    width: int,
    *,
    progress: bool = True,
) -> LinearFitStats:
    """Stream ``batches`` through ``model`` and return the sums of :class:`LinearFitCollector` (on CPU)."""
    with LinearFitCollector(model, pairs, width) as collector:
        for batch in track(list(batches), "fitting linear patch", enabled=progress):
            collector.observe(batch)
    result = collector.stats.to("cpu")
    if not all(torch.isfinite(tensor).all() for tensor in result.tensors().values()):
        raise NonFiniteActivationError(
            "the activations feeding the linear patch contain NaN/Inf; check the weights or use "
            "--dtype float32"
        )
    return result
