"""Evaluate a pruned model from where it first differs from the unpruned one.

A model whose first removed block is ``k`` computes, on the same batch, exactly what the unpruned model
computes before block ``k``: its blocks ``0..k-1`` are the same modules fed the same inputs. A study evaluates
dozens of pruned models on the same examples, in the same batches (batching depends only on the tokens), so
it can record the residual stream entering a few blocks ``start`` once, while the unpruned model is
evaluated, and then run each pruned model from the latest recorded ``start <= k``: the model still embeds the
tokens and builds its masks and position embeddings itself, but runs only its blocks from ``start`` on, whose
input is replaced by the recorded state (:func:`~avss.adapters.suffix_view`, the mechanism the cached
leave-one-out scorer uses). The numbers are the same to the bit, not merely close.

The input of block ``s <= k`` is also the same in the pruned model (its block ``s`` is fed the output of the
unpruned blocks ``0..s-1``), so any cell records the starts it passes on its way that are not recorded yet
(:meth:`PrefixStore.run`): the unpruned model's evaluation records them all, and a resumed study, whose
unpruned model is already evaluated, records them during its first cells instead of evaluating it again.

States are kept on disk, one file per task and start, and read back memory-mapped; a replay checks that every
recorded state has the shape of the input it replaces and that the forward passes match one to one, and
raises :class:`PrefixMismatch` otherwise, so a replay that does not fit cannot produce a number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avss.adapters import block_input, get_adapter, hooks, replace_input, suffix_view


class PrefixMismatch(RuntimeError):
    """A recorded prefix does not fit the evaluation replaying it (another task, limit or batching)."""


def choose_starts(first_removed: Sequence[int], most: int = 3) -> list[int]:
    """Up to ``most`` blocks to record, chosen greedily to skip the most blocks over the cells, where a cell
    whose first removed block is ``k`` runs from the largest recorded start ``<= k``."""
    candidates = sorted({k for k in first_removed if k > 0})
    starts: list[int] = []
    for _ in range(most):
        gains = {c: skipped([*starts, c], first_removed) for c in candidates if c not in starts}
        if not gains or max(gains.values()) <= skipped(starts, first_removed):
            break
        starts.append(max(gains, key=lambda c: (gains[c], -c)))
    return sorted(starts)


def skipped(starts: Sequence[int], first_removed: Sequence[int]) -> int:
    """Blocks not run over all cells when each starts at the largest of ``starts`` not above its ``k``."""
    return sum(max((s for s in starts if s <= k), default=0) for k in first_removed)


def start_for(first_removed: int, starts: Sequence[int], depth: int | None = None) -> int:
    """The block a cell whose first removed block is ``first_removed`` runs from (0: the whole model); a
    start must be one of the pruned model's ``depth`` blocks (the state is fed to a block, not the head)."""
    return max((s for s in starts if s <= first_removed and (depth is None or s < depth)), default=0)


class PrefixStore:
    """Recorded block inputs of the unpruned model, per task and start block, in ``root``."""

    def __init__(self, root: Path, starts: Sequence[int]):
        self.root = Path(root)
        self.starts = sorted(starts)

    def path(self, task: str, start: int) -> Path:
        return self.root / f"{task}.block{start}.pt"

    def has(self, task: str, start: int) -> bool:
        """Whether the inputs of block ``start`` were recorded for ``task``."""
        return self.path(task, start).exists()

    @contextlib.contextmanager
    def run(self, model: nn.Module, task: str, first_removed: int | None = None) -> Iterator[None]:
        """Evaluate ``model``, whose first removed block is ``first_removed`` (None: none removed), from the
        latest start at or before that block recorded for ``task``, recording the later starts up to that
        block that are not recorded yet."""
        depth = get_adapter(model).num_layers
        last = depth - 1 if first_removed is None else first_removed
        start = start_for(last, [s for s in self.starts if self.has(task, s)], depth)
        missing = [s for s in self.starts if start < s <= last and s < depth and not self.has(task, s)]
        with contextlib.ExitStack() as stack:
            if missing:  # hooks on the full block list, before a replay slices it
                stack.enter_context(self.record(model, task, missing))
            if start:
                stack.enter_context(self.replay(model, task, start))
            yield

    @contextlib.contextmanager
    def record(self, model: nn.Module, task: str, starts: Sequence[int] | None = None) -> Iterator[None]:
        """Record the input of the ``starts`` blocks (every start) during the forward passes inside the
        block; each file is written whole or not at all."""
        blocks = get_adapter(model).blocks
        starts = self.starts if starts is None else starts
        captured: dict[int, list[torch.Tensor]] = {start: [] for start in starts}

        def capture(start: int) -> Any:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[start].append(block_input(args, kwargs).detach().to("cpu", copy=True))

            return blocks[start].register_forward_pre_hook(hook, with_kwargs=True)

        with hooks(*(capture(start) for start in captured)):
            yield
        self.root.mkdir(parents=True, exist_ok=True)
        for start, states in captured.items():
            path = self.path(task, start)
            partial = path.with_name(f".{path.name}.tmp")
            torch.save(states, partial)
            partial.replace(path)

    @contextlib.contextmanager
    def replay(self, model: nn.Module, task: str, start: int) -> Iterator[None]:
        """Run ``model`` from block ``start`` on, fed the recorded inputs of that block in order."""
        states = torch.load(self.path(task, start), mmap=True, weights_only=True)
        adapter = get_adapter(model)
        position = iter(range(len(states)))

        def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            index = next(position, None)
            current = block_input(args, kwargs)
            if index is None or states[index].shape != current.shape:
                raise PrefixMismatch(
                    f"the recorded inputs of block {start} do not fit this evaluation of {task}"
                )
            return replace_input(args, kwargs, states[index].to(current.device))

        handle = adapter.blocks[start].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
        with hooks(handle), suffix_view(adapter, start):
            yield
        if next(position, None) is not None:
            raise PrefixMismatch(f"fewer forward passes than recorded for {task} from block {start}")
