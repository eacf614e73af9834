"""Where this process stands in a ``torchrun`` / ``accelerate launch`` job, and joining its process group.

Kept apart from the statistics pass (:mod:`avss.stats.distributed`) so that loading a model, which needs only
this rank's GPUs (:func:`rank_max_memory`), does not import the collection machinery.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from avss.errors import OptionError

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
