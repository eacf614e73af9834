"""LLM-Streamline's replacement blocks: one new block per contiguous removed span, trained by MSE to map the
*original* model's hidden state entering the span to the one leaving it.

:class:`SpanTeacher` runs the unpruned model once per batch and captures, for every span, the hidden state
entering it, the one leaving it, and the call arguments of the template block; :class:`ReplacementStudents`
holds the trainable copies and returns their mean masked MSE, so the shared training loop sees one module
with one loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from avss.adapters import block_input, first_tensor, get_adapter
from avss.pruning.rules import contiguous_spans, kept_layers

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Replacement:
    """Where one replacement block goes, in original and pruned layer numbering.

    ``template`` is the original block the replacement is copied from and whose call arguments (attention
    mask type, rotary embeddings) it receives; ``insert_at`` is its index in the healed model's block list.
    """

    first: int
    last: int
    template: int
    insert_at: int


def plan_replacements(removed: list[int], original_num_layers: int) -> list[Replacement]:
    kept = kept_layers(removed, original_num_layers)
    plans = []
    for offset, (first, last) in enumerate(contiguous_spans(removed)):
        template = first - 1 if first > 0 else last + 1
        kept_before = sum(1 for layer in kept if layer < first)
        plans.append(Replacement(first, last, template, kept_before + offset))
    return plans


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real tokens (``mask`` 1) and all channels."""
    weights = mask.to(prediction.dtype).unsqueeze(-1)
    squared = (prediction.float() - target.float()).pow(2) * weights
    return squared.sum() / (weights.sum() * prediction.shape[-1]).clamp_min(1)


class _StopForward(Exception):
    """Raised by a hook once every needed hidden state is captured, to skip the rest of the forward pass."""


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The call arguments of a block with its residual-stream input swapped for ``hidden``."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    name = next(
        key for key in ("hidden_states", "x", "hidden_state") if isinstance(kwargs.get(key), torch.Tensor)
    )
    return args, {**kwargs, name: hidden}


class SpanTeacher:
    """Runs the original model and captures, for each replacement, the span's input and output hidden
    states and the template block's call arguments, stopping the forward pass after the deepest block
    needed."""

    def __init__(self, teacher: nn.Module, plans: list[Replacement]):
        self.teacher = teacher
        self.plans = plans
        self.blocks = get_adapter(teacher).blocks
        self.deepest = max(max(plan.last, plan.template) for plan in plans)

    @contextmanager
    def _hooks(self, captured: dict[tuple[str, int], Any]) -> Iterator[None]:
        handles = []

        def save_call(layer: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                captured["call", layer] = (args, kwargs)
                captured["input", layer] = block_input(args, kwargs)

            return hook

        def save_output(layer: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                captured["output", layer] = first_tensor(output)
                if layer == self.deepest:
                    raise _StopForward

            return hook

        layers = {plan.first for plan in self.plans} | {plan.template for plan in self.plans}
        try:
            for layer in sorted(layers):
                handles.append(
                    self.blocks[layer].register_forward_pre_hook(save_call(layer), with_kwargs=True)
                )
            for layer in sorted({plan.last for plan in self.plans} | {self.deepest}):
                handles.append(self.blocks[layer].register_forward_hook(save_output(layer)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def capture(self, batch: Batch) -> dict[tuple[str, int], Any]:
        captured: dict[tuple[str, int], Any] = {}
        with self._hooks(captured), suppress(_StopForward):
            self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            )
        return captured


class ReplacementStudents(nn.Module):
    """The replacement blocks being trained; calling it on a batch returns their loss: the mean over spans
    of the masked MSE between ``student(h_in)`` and the original model's ``h_out``.

    The teacher is held outside the module tree so that only the students' parameters are visible to the
    training loop and to checkpoints.
    """

    def __init__(self, teacher: SpanTeacher, students: list[nn.Module]):
        super().__init__()
        self.students = nn.ModuleList(students)
        self._teacher = teacher

    def forward(self, batch: Batch) -> torch.Tensor:
        captured = self._teacher.capture(batch)
        losses = []
        for plan, student in zip(self._teacher.plans, self.students, strict=True):
            args, kwargs = captured["call", plan.template]
            args, kwargs = _with_hidden(args, kwargs, captured["input", plan.first])
            prediction = first_tensor(student(*args, **kwargs))
            losses.append(masked_mse(prediction, captured["output", plan.last], batch["attention_mask"]))
        return torch.stack(losses).mean()
