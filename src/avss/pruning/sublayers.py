"""Removing attention or MLP sublayers of blocks (LLM-Drop's attention drop): ``avss prune --sublayer attn``.

A block whose attention sublayer is removed keeps its MLP and its residual stream; the attention adds nothing.
In memory the sublayer's module is replaced by a :class:`RemovedSublayer` that returns zeros of the shape the
block expects, holds no parameters and does no work, so the removal saves the attention's compute and memory
(the pre-attention norm still runs: O(d) per token). Where the sublayers sit, and that the stream between
them can be read, is the architecture table's business (``attn_residual`` and ``mlp`` in
:mod:`avss.adapters`).

Saving. A plain Hugging Face config cannot say "block 3 has no attention", and a saved model must reload with
``from_pretrained`` and no custom code, so a model with removed sublayers is written with every tensor of each
removed sublayer set to zero (:func:`restored_sublayers`). Its output is then exactly zero: the attention's
output projection and bias are zero, and so are its queries, keys and values, so healing cannot revive it
(every gradient into those weights passes a zero projection or a zero input: LoRA leaves them at zero; full
fine-tuning can only grow an output bias, where there is one, into a constant).
The reloaded model gives the in-memory model's logits, but **saves no compute and no parameters in the saved
files**: the record (``avss_pruning.json``) and the command line say so. What the removal buys on disk and at
inference needs a runtime that skips zeroed sublayers; a block budget saves both everywhere.

The KV cache. Decoder models ask layer 0's cache for the number of tokens seen (positions, mask sizes), so a
removed attention must still advance its layer of the cache: it stores one zero per token and sequence
(shape ``(batch, 1, tokens, 1)``, not ``(batch, heads, tokens, head_dim)``), and cached decoding gives the
logits of a full forward pass.

Budgets. Attention sublayers are much smaller than blocks (a quarter of a SmolLM2-135M block, whose grouped
query attention has 3 key-value heads for 9 query heads), so comparisons with block removal are made at
equal parameters removed: :func:`equal_parameter_budget` converts a block budget into the number of
sublayers holding the same parameters, counted from the model's own modules.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from avss.adapters import get_adapter
from avss.errors import PruneConfigError, UnsupportedArchitectureError
from avss.pruning.rules import SUBLAYERS, check_sublayer

SUBLAYER_NAMES = {"attn": "attention", "mlp": "MLP"}
SAVED_AS = "zeros"
SAVED_NOTE = (
    "in the saved files every removed sublayer is kept with all its weights set to zero, so the model "
    "reloads with plain from_pretrained and gives the same logits; the saved model has the original "
    "parameter count and still computes those sublayers (their output is zero), so on disk and at inference "
    "this saves no compute and no parameters; only the in-memory model skips them"
)


@dataclass(frozen=True)
class SavedForm:
    """A removed module as a skeleton on the ``meta`` device: its class, options and tensor shapes, no data.

    Kept outside the module tree (a dataclass is not registered as a submodule), so the removed sublayer
    holds no memory, shows no parameters and writes nothing to a state dict until :func:`restored_sublayers`
    materializes it.
    """

    module: nn.Module

    def zeros(self, device: torch.device) -> nn.Module:
        """A new module of the original class with every parameter and buffer zero (on ``device``)."""
        module = copy.deepcopy(self.module).to_empty(device=device)
        with torch.no_grad():
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                tensor.zero_()
        return module


class RemovedSublayer(nn.Module):
    """Stands where a removed sublayer was: its output is zero, it holds no parameters and does no work."""

    kind: ClassVar[str]

    def __init__(self, original: nn.Module):
        super().__init__()
        self.parameters_removed = sum(parameter.numel() for parameter in original.parameters())
        self.saved_form = SavedForm(original.to("meta"))

    def extra_repr(self) -> str:
        return f"{self.kind} removed, {self.parameters_removed} parameters"


class RemovedAttention(RemovedSublayer):
    """A removed attention sublayer: ``(zeros like the input, None)``, the pair every supported decoder layer
    unpacks from ``self_attn(...)`` / ``attn(...)`` (output and attention weights).

    Given a cache (``cache``, or ``past_key_values`` before transformers 5), it appends one zero per token to
    its layer so every layer of the cache counts the same tokens (see the module docstring). ``layer_idx``
    follows block removal like any attention module's (:meth:`~avss.adapters.LayerAdapter.keep_layers`).
    """

    kind = "attn"

    def __init__(self, original: nn.Module):
        layer_idx = getattr(original, "layer_idx", None)
        if not isinstance(layer_idx, int):
            raise UnsupportedArchitectureError(
                f"{type(original).__name__} has no layer_idx, so a removed attention could not keep its "
                "layer of the KV cache"
            )
        super().__init__(original)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMlp(RemovedSublayer):
    """A removed MLP sublayer: zeros like its input (an MLP maps the hidden size to itself)."""

    kind = "mlp"

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


REMOVED: dict[str, type[RemovedSublayer]] = {"attn": RemovedAttention, "mlp": RemovedMlp}


def removed_sublayers(model: nn.Module) -> dict[str, list[int]]:
    """The blocks whose ``attn`` / ``mlp`` sublayer is removed, per kind (empty lists where none is)."""
    adapter = get_adapter(model)
    if adapter.spec.attn_residual is None:
        return {kind: [] for kind in SUBLAYERS}
    return {
        kind: [
            layer
            for layer in range(adapter.num_layers)
            if isinstance(adapter.sublayer_module(layer, kind), RemovedSublayer)
        ]
        for kind in SUBLAYERS
    }


def remove_sublayers(model: nn.Module, kind: str, layers: list[int]) -> int:
    """Remove the ``kind`` sublayer of blocks ``layers`` in place; returns the parameters they held.

    Refuses an index out of range or listed twice, a sublayer already removed, and removing the last
    remaining sublayer of that kind, before changing anything.
    """
    check_sublayer(kind)
    adapter = get_adapter(model)
    adapter.sublayer_path(kind)  # refuses architectures without separable sublayers
    num_layers = adapter.num_layers
    name = SUBLAYER_NAMES[kind]
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise PruneConfigError(f"block {bad[0]} out of range for a {num_layers}-block model")
    if len(set(layers)) != len(layers):
        raise PruneConfigError(f"the {name} sublayers to remove list a block twice: {sorted(layers)}")
    already = removed_sublayers(model)[kind]
    if set(layers) & set(already):
        raise PruneConfigError(
            f"the {name} sublayer of block {sorted(set(layers) & set(already))[0]} is removed"
        )
    if len(layers) + len(already) >= num_layers:
        raise PruneConfigError(
            f"cannot remove {len(layers) + len(already)} of {num_layers} {name} sublayers: at least one "
            "must remain"
        )
    removed = 0
    for layer in sorted(layers):
        replacement = REMOVED[kind](adapter.sublayer_module(layer, kind))
        adapter.set_sublayer_module(layer, kind, replacement)
        removed += replacement.parameters_removed
    return removed


@contextlib.contextmanager
def restored_sublayers(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every removed sublayer is back as a module of its original class with all tensors zero: the
    form in which :func:`avss.pruning.prune.save_pruned` writes it (see the module docstring). Restored on
    exit.

    A model without removed sublayers is left as it is.
    """
    removed = [
        (name, module) for name, module in model.named_modules() if isinstance(module, RemovedSublayer)
    ]
    swapped = []
    try:
        for name, module in removed:
            parent_path, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_path)
            device = next(
                (p.device for p in parent.parameters() if p.device.type != "meta"), torch.device("cpu")
            )
            setattr(parent, attr, module.saved_form.zeros(device))
            swapped.append((parent, attr, module))
        yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


# --- parameter budgets


def original_parameters(module: nn.Module) -> int:
    """Parameters of ``module`` as it was before any of its sublayers were removed."""
    held = sum(parameter.numel() for parameter in module.parameters())
    return held + sum(m.parameters_removed for m in module.modules() if isinstance(m, RemovedSublayer))


def block_parameters(model: nn.Module) -> list[int]:
    """Parameters of each block (every module in it, norms included), counted from the model."""
    return [original_parameters(block) for block in get_adapter(model).blocks]


def sublayer_parameters(model: nn.Module, kind: str) -> list[int]:
    """Parameters of each block's ``kind`` sublayer module (the attention's projections and q/k norms; the
    pre-attention norm, d values, belongs to the block)."""
    check_sublayer(kind)
    adapter = get_adapter(model)
    return [original_parameters(adapter.sublayer_module(layer, kind)) for layer in range(adapter.num_layers)]


def equal_parameter_count(blocks: int, block_size: float, sublayer_size: float) -> int:
    """The number of sublayers whose parameters come nearest to those of ``blocks`` blocks."""
    if blocks < 1 or not block_size > 0 or not sublayer_size > 0:
        raise PruneConfigError(f"need at least one block of positive size to convert, got {blocks}")
    return round(blocks * block_size / sublayer_size)


@dataclass(frozen=True)
class ParameterBudget:
    """A block budget and the sublayer budget removing (nearly) the same parameters.

    Sizes are means over the model's blocks (identical in every supported architecture).
    """

    kind: str
    blocks: int
    sublayers: int
    block_size: float
    sublayer_size: float
    num_layers: int

    @property
    def block_parameters(self) -> int:
        return round(self.blocks * self.block_size)

    @property
    def sublayer_parameters(self) -> int:
        return round(self.sublayers * self.sublayer_size)

    @property
    def feasible(self) -> bool:
        """Whether that many sublayers can be removed with one left, as :func:`remove_sublayers` requires."""
        return 1 <= self.sublayers < self.num_layers


def equal_parameter_budget(model: nn.Module, blocks: int, kind: str = "attn") -> ParameterBudget:
    """How many ``kind`` sublayers hold the parameters of ``blocks`` blocks of ``model``.

    A study comparing sublayer removal with block removal compares at this budget ("equal parameters
    removed"), not at equal counts. On small grouped-query models the answer can exceed the number of
    blocks (``feasible`` is then false): attention alone cannot remove that many parameters.
    """
    sizes, sublayer_sizes = block_parameters(model), sublayer_parameters(model, kind)
    block_size, sublayer_size = sum(sizes) / len(sizes), sum(sublayer_sizes) / len(sublayer_sizes)
    count = equal_parameter_count(blocks, block_size, sublayer_size)
    return ParameterBudget(kind, blocks, count, block_size, sublayer_size, len(sizes))


def sublayer_record(model: nn.Module, kind: str, removed: list[int], parameters: int) -> dict[str, Any]:
    """The ``sublayers`` entry of a pruning record: what was removed and what the saved files still hold."""
    sizes = block_parameters(model)
    return {
        "kind": kind,
        "removed": sorted(removed),
        "parameters_removed_in_memory": parameters,
        "block_equivalent": parameters / (sum(sizes) / len(sizes)),
        "saved_as": SAVED_AS,
        "saves_compute_in_saved_files": False,
        "note": SAVED_NOTE,
    }
