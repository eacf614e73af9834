"""Statistics passes spread over processes: ``torchrun`` / ``accelerate launch``, gloo on CPU, NCCL on GPU.

Each rank streams its own share of the calibration batches through its own copy of the model, then one
``all_gather`` of a flat float64 vector per rank lets every rank merge all shards in rank order with Chan's
formula (counts and sums add). Sharding is by whole batch, round robin, without padding or duplication, so
every batch is reduced exactly as a single process would reduce it and the merged statistics equal the
single-process ones up to float64 rounding of the merge order. Rank 0 writes the outputs.

Launch (see docs/scaling.md for several machines)::

    torchrun --nproc_per_node 4 -m avss score smollm2-135m --out scores.json
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from avss.errors import OptionError
from avss.launch import setup_distributed
from avss.stats.accumulators import ActivationStats, LinearFitStats
from avss.stats.collect import collect_linear_fit, collect_statistics


def _flat_tensors(stats: ActivationStats) -> list[torch.Tensor]:
    site_tensors = [tensor for site in stats.sites.values() for tensor in site.tensors().values()]
    sublayer_tensors = [] if stats.sublayers is None else list(stats.sublayers.tensors().values())
    return site_tensors + list(stats.relations.tensors().values()) + sublayer_tensors


def pack(stats: ActivationStats) -> torch.Tensor:
    """All accumulators and the sequence count as one flat float64 vector (the same layout on every rank)."""
    parts = [tensor.detach().reshape(-1).cpu() for tensor in _flat_tensors(stats)]
    sequences = torch.tensor([float(stats.num_sequences)], dtype=torch.float64)
    return torch.cat([*parts, sequences])


def unpack(flat: torch.Tensor, like: ActivationStats) -> ActivationStats:
    """Inverse of :func:`pack`, shaped like ``like`` (same layers, sites, thresholds and sublayer sums)."""
    stats = ActivationStats.empty(
        like.num_layers, tuple(like.sites), like.thresholds, sublayers=like.sublayers is not None
    )
    stats.meta = dict(like.meta)
    offset = 0
    for tensor in _flat_tensors(stats):
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    stats.num_sequences = int(flat[offset].item())
    return stats


def all_gather_stats(stats: ActivationStats) -> ActivationStats:
    """Every rank receives the merge of all ranks' statistics, merged in rank order (identical everywhere)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flat = pack(stats).to(device or "cpu")
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    shards = [unpack(part.cpu(), stats) for part in gathered]
    return functools.reduce(ActivationStats.merge, shards)


def collect_distributed(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], **kwargs: Any
) -> ActivationStats:
    """:func:`~avss.stats.collect.collect_statistics` over this rank's shard, merged across ranks.

    Without a launcher this is exactly ``collect_statistics``. Only rank 0 shows progress and continues a
    resumed ``stats``; ``on_batch`` sees this rank's partial statistics.
    """
    ctx = setup_distributed()
    if not ctx.enabled:
        return collect_statistics(model, batches, **kwargs)
    if kwargs.get("on_batch") is not None:
        raise OptionError(
            "checkpoints hold one process's statistics; run without --checkpoint-every under torchrun"
        )
    kwargs["progress"] = kwargs.get("progress", True) and ctx.is_main
    if not ctx.is_main:
        kwargs.pop("stats", None)  # a resumed partial pass is counted once, by rank 0
    local = collect_statistics(model, ctx.shard(list(batches)), **kwargs)
    return all_gather_stats(local)


def all_reduce_linear_fit(stats: LinearFitStats) -> LinearFitStats:
    """Every rank receives the sums over all ranks' tokens (one float64 ``all_reduce``).

    The sums are (fits, d, d) matrices, 268 MB per fit at d = 4096, so they are summed in place rather than
    gathered (a gather would hold ``world_size`` copies); addition is their exact merge, up to float64
    rounding of the reduction order.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    merged = LinearFitStats(stats.num_fits, stats.width)
    for name, tensor in stats.tensors().items():
        total = tensor.to(device or "cpu").clone()
        dist.all_reduce(total)
        setattr(merged, name, total.cpu())
    return merged


def collect_linear_fit_distributed(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], **kwargs: Any
) -> LinearFitStats:
    """:func:`~avss.stats.collect.collect_linear_fit` over this rank's shard of ``batches``, summed across
    ranks; exactly ``collect_linear_fit`` without a launcher."""
    ctx = setup_distributed()
    if not ctx.enabled:
        return collect_linear_fit(model, batches, **kwargs)
    kwargs["progress"] = kwargs.get("progress", True) and ctx.is_main
    local = collect_linear_fit(model, ctx.shard(list(batches)), **kwargs)
    return all_reduce_linear_fit(local)
