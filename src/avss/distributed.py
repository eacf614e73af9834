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

import atexit
import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from avss.collect import collect_linear_fit, collect_statistics
from avss.errors import OptionError
from avss.stats import ActivationStats, LinearFitStats

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job; a single process is rank 0 of a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: ``rank, rank + world, ...`` (uneven shards, never padded or duplicated)."""
        return list(items[self.rank :: self.world_size])

    def gpus(self, device_count: int) -> list[int]:
        """This rank's GPUs: an equal, contiguous slice of its node's ``device_count`` GPUs.

        One rank per GPU gives each rank its own GPU; fewer ranks than GPUs (``--nproc_per_node 2`` on an
        8-GPU node) give each rank several GPUs for a ``device_map`` model too large for one, without two
        ranks ever sharing a GPU (NCCL refuses that).
        """
        per_rank = device_count // self.local_world_size
        if per_rank == 0:
            raise OptionError(
                f"{self.local_world_size} processes on this node but only {device_count} GPU(s); "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        return list(range(self.local_rank * per_rank, (self.local_rank + 1) * per_rank))


def context() -> DistributedContext:
    """The launch environment as set by torchrun or accelerate (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return DistributedContext(rank, world_size, local_rank, local_world_size)


def setup_distributed() -> DistributedContext:
    """Join the launcher's process group if there is one (idempotent); a no-op for a single process.

    Picks NCCL when CUDA is available (and binds this process to the first of its GPUs, see
    :meth:`DistributedContext.gpus`, so a later ``--device cuda`` lands on its own GPU) and gloo otherwise.
    Call it before loading the model.
    """
    ctx = context()
    if not ctx.enabled or dist.is_initialized():
        return ctx
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ctx.gpus(torch.cuda.device_count())[0])
    dist.init_process_group(backend)
    atexit.register(_teardown)
    return context()


def rank_max_memory() -> dict[int, int] | None:
    """``max_memory`` that confines a ``device_map`` model to this rank's GPUs (free memory of each).

    None for a single process or without CUDA, where accelerate may use every device it sees.
    """
    ctx = context()
    if not ctx.enabled or not torch.cuda.is_available():
        return None
    return {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in ctx.gpus(torch.cuda.device_count())}


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _flat_tensors(stats: ActivationStats) -> list[torch.Tensor]:
    site_tensors = [tensor for site in stats.sites.values() for tensor in site.tensors().values()]
    return site_tensors + list(stats.relations.tensors().values())


def pack(stats: ActivationStats) -> torch.Tensor:
    """All accumulators and the sequence count as one flat float64 vector (the same layout on every rank)."""
    parts = [tensor.detach().reshape(-1).cpu() for tensor in _flat_tensors(stats)]
    sequences = torch.tensor([float(stats.num_sequences)], dtype=torch.float64)
    return torch.cat([*parts, sequences])


def unpack(flat: torch.Tensor, like: ActivationStats) -> ActivationStats:
    """Inverse of :func:`pack`, shaped like ``like`` (same layers, sites and thresholds)."""
    stats = ActivationStats.empty(like.num_layers, tuple(like.sites), like.thresholds)
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
    """:func:`~avss.collect.collect_statistics` over this rank's shard, merged across ranks.

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
    """:func:`~avss.collect.collect_linear_fit` over this rank's shard of ``batches``, summed across ranks;
    exactly ``collect_linear_fit`` without a launcher."""
    ctx = setup_distributed()
    if not ctx.enabled:
        return collect_linear_fit(model, batches, **kwargs)
    kwargs["progress"] = kwargs.get("progress", True) and ctx.is_main
    local = collect_linear_fit(model, ctx.shard(list(batches)), **kwargs)
    return all_reduce_linear_fit(local)
