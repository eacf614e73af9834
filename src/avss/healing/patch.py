"""Training-free repair of a pruned model by a linear map (ReplaceMe-style): ``avss prune --patch linear``.

For each contiguous run ``first..last`` of removed blocks, the kept block ``source = first - 1`` adds its MLP
output ``m`` to its residual stream ``r``, and the run then turns ``r + m`` into ``y`` (``last``'s output,
the input of the first kept block after the run). Once the run is gone, the next kept block receives
``r + m``; folding a map ``T`` into ``source``'s MLP down projection makes it receive ``r + m T`` instead.
``T`` minimizes ``sum over real tokens |m T - (y - r)|^2 + lambda |T|^2``, solved once from the streamed
float64 sums ``m^T m`` and ``m^T (y - r)`` (:class:`~avss.stats.accumulators.LinearFitStats`, collected by
:class:`~avss.stats.collect.LinearFitCollector` on the *unpruned* model, all runs in one pass).

Choices:

- ``lambda = ridge x trace(m^T m) / d``: the ridge is relative to the mean eigenvalue of the Gram matrix, so
  one value means the same for any number of tokens and any activation scale (default 0, plain least
  squares; a singular Gram matrix is then an error that names ``--patch-ridge``).
- A run that starts at block 0 has no preceding MLP, so ``PruneSpec(patch=...)`` protects block 0 and
  :func:`plan_runs` refuses such a run when removal was chosen some other way.
- Folding is exact only where the block's output is its residual stream plus the down projection's output.
  Architectures with a norm in the way (Gemma 2/3 and OLMo 2's post-feedforward norm, post-LN encoders;
  ``mlp_output_norm`` in :mod:`avss.adapters`) are refused before any scoring is spent.
- Every run is fitted on the unpruned model's activations; for runs after the first, the patched model's
  ``r`` and ``m`` differ from those by what the earlier patches left uncorrected.

Memory: two ``d x d`` float64 sums per run (268 MB at d = 4096), checked against the free memory of the
device before the pass. The solve and the fold are pure functions of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avss.adapters import LayerAdapter, get_adapter
from avss.errors import PruneConfigError
from avss.pruning.rules import contiguous_spans
from avss.stats.accumulators import ACCUMULATOR_DTYPE, LinearFitStats
from avss.stats.collect import execution_device
from avss.stats.distributed import collect_linear_fit_distributed


@dataclass(frozen=True)
class PatchRun:
    """One contiguous run of removed blocks (original indices, inclusive) and the kept block before it."""

    first: int
    last: int

    @property
    def source(self) -> int:
        """The kept block whose MLP down projection carries the run's map."""
        return self.first - 1

    @property
    def removed(self) -> list[int]:
        return list(range(self.first, self.last + 1))


def plan_runs(removed: list[int], num_layers: int) -> list[PatchRun]:
    """The removed runs in order; refuses a run starting at block 0, which has no preceding MLP."""
    if not removed:
        raise PruneConfigError("--patch linear: nothing was removed, so there is nothing to patch")
    bad = [layer for layer in removed if not 0 <= layer < num_layers]
    if bad:
        raise PruneConfigError(f"layer index {bad[0]} out of range for a {num_layers}-layer model")
    runs = [PatchRun(first, last) for first, last in contiguous_spans(removed)]
    if runs[0].first == 0:
        raise PruneConfigError(
            f"--patch linear: the removed run {runs[0].first}-{runs[0].last} starts at block 0, which has no "
            "preceding block whose MLP could carry the map; keep block 0 (--protect first, which "
            "avss prune --patch linear applies itself)"
        )
    return runs


# --- the solve and the fold: pure functions of tensors


def ridge_lambda(xtx: torch.Tensor, ridge: float) -> float:
    """The absolute ridge term: ``ridge`` times the mean eigenvalue (trace / d) of the Gram matrix."""
    return float(ridge * torch.diagonal(xtx).sum() / xtx.shape[-1])


def solve_linear_map(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``T = (X^T X + lambda I)^-1 X^T Y`` in float64 (Cholesky), with ``lambda`` from :func:`ridge_lambda`.

    This minimizes ``|X T - Y|^2 + lambda |T|^2``; with ``ridge=0`` it is ``torch.linalg.lstsq(X, Y)``
    computed from the sums alone. A Gram matrix that is not positive definite (fewer tokens than channels,
    or dead channels) raises :class:`PruneConfigError`.
    """
    gram = xtx.to(ACCUMULATOR_DTYPE)
    width = gram.shape[-1]
    gram = gram + ridge_lambda(gram, ridge) * torch.eye(width, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise PruneConfigError(
            f"--patch linear: the {width} x {width} Gram matrix m^T m is singular (fewer fit tokens than "
            "channels, or channels that are always zero); use more calibration tokens (--samples) or a "
            "ridge, e.g. --patch-ridge 1e-4"
        )
    return torch.cholesky_solve(xty.to(ACCUMULATOR_DTYPE), factor)


def squared_error(xtx: torch.Tensor, xty: torch.Tensor, yy: torch.Tensor, map_: torch.Tensor) -> float:
    """``sum |X T - Y|^2`` from the sums: ``|Y|^2 - 2 tr(T^T X^T Y) + tr(T^T X^T X T)`` (float64, >= 0)."""
    t = map_.to(ACCUMULATOR_DTYPE)
    value = yy - 2 * (t * xty).sum() + (t * (xtx @ t)).sum()
    return max(float(value), 0.0)


def fold_linear_map(
    weight: torch.Tensor, bias: torch.Tensor | None, map_: torch.Tensor, layout: str = "out_in"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of a projection whose output is the old output times ``map_``: ``y' = y T``.

    ``layout`` is how the weight is stored: ``out_in`` (``nn.Linear``, ``y = x W^T + b``, so
    ``W' = T^T W``) or ``in_out`` (GPT-2's ``Conv1D``, ``y = x W + b``, so ``W' = W T``); ``b' = b T``.
    Computed in float64 and returned in the weight's dtype.
    """
    t = map_.to(device=weight.device, dtype=ACCUMULATOR_DTYPE)
    w = weight.to(ACCUMULATOR_DTYPE)
    if layout == "out_in":
        folded = t.T @ w
    elif layout == "in_out":
        folded = w @ t
    else:
        raise ValueError(f"unknown weight layout {layout!r}; choose out_in or in_out")
    new_bias = None if bias is None else (bias.to(ACCUMULATOR_DTYPE) @ t).to(bias.dtype)
    return folded.to(weight.dtype), new_bias


def output_width(module: nn.Module, layout: str) -> int:
    """The number of output channels of a projection stored in ``layout``."""
    weight = module.weight
    return int(weight.shape[0] if layout == "out_in" else weight.shape[1])


# --- checks before anything is spent


def check_patchable(model: nn.Module) -> LayerAdapter:
    """Refuse an architecture where a map folded into the MLP down projection would not act on what the
    MLP adds to the residual stream (a norm in the way); returns the model's adapter."""
    adapter = get_adapter(model)
    obstacle = adapter.mlp_output_obstacle()
    if obstacle is not None:
        raise PruneConfigError(
            f"--patch linear cannot be folded into this model: {obstacle}, so a map folded into "
            f"{adapter.spec.mlp_down} would not be the map added to the residual stream; prune without "
            "--patch (or heal instead, --heal lora)"
        )
    return adapter


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, Linux's MemAvailable for the CPU, else None."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        if meminfo.is_file():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def fit_memory_bytes(num_runs: int, width: int, batch_tokens: int) -> int:
    """Peak memory of the fit: the sums, plus one batch's float64 copies and products (or the solve's
    factor, matrix and solution, whichever is larger)."""
    item = torch.finfo(ACCUMULATOR_DTYPE).bits // 8
    working = max(3 * batch_tokens * width * item + 2 * width * width * item, 3 * width * width * item)
    return LinearFitStats.bytes_needed(num_runs, width) + working


def check_fit_memory(num_runs: int, width: int, batch_tokens: int, device: torch.device) -> int:
    """Refuse a fit whose sums would not fit in ``device``'s free memory; returns the bytes needed."""
    needed = fit_memory_bytes(num_runs, width, batch_tokens)
    free = available_memory(device)
    if free is not None and needed > free:
        raise PruneConfigError(
            f"--patch linear needs {needed / 1e9:.2f} GB on {device} for {num_runs} run(s) at width {width} "
            f"(two {width} x {width} float64 sums per run), but only {free / 1e9:.2f} GB are free; remove "
            "fewer separate runs, use smaller batches, or a device with more memory"
        )
    return needed


def largest_batch(batches: list[dict[str, torch.Tensor]]) -> int:
    return max((int(batch["input_ids"].numel()) for batch in batches), default=0)


def check_linear_patch(model: nn.Module, batches: list[dict[str, torch.Tensor]], num_runs: int = 1) -> int:
    """Everything that can be checked before a pass: the architecture and the memory for ``num_runs``."""
    adapter = check_patchable(model)
    down = adapter.site_module(0, "mlp")
    width = output_width(down, adapter.spec.mlp_down_layout)
    return check_fit_memory(num_runs, width, largest_batch(batches), execution_device(model))


# --- fit, fold, record


@dataclass
class LinearPatch:
    """The fitted maps, one per run, and what the fit measured (the provenance record)."""

    runs: list[PatchRun]
    maps: list[torch.Tensor]
    stats: LinearFitStats
    ridge: float

    def record(self, adapter: LayerAdapter | None = None) -> dict[str, Any]:
        """JSON-ready provenance: the runs, the ridge, the fit tokens and each run's residual fit error.

        ``fit_error`` is the mean over fit tokens of ``|m T - (y - r)|^2``; ``unpatched_error`` the same for
        ``T = I`` (plain removal); ``relative_fit_error`` their ratio, the share of the hidden-state error
        left after the patch.
        """
        runs = []
        for index, (run, map_) in enumerate(zip(self.runs, self.maps, strict=True)):
            s = self.stats
            count = max(float(s.count[index]), 1.0)
            identity = torch.eye(s.width, dtype=ACCUMULATOR_DTYPE)
            fitted = squared_error(s.xtx[index], s.xty[index], s.yy[index], map_) / count
            unpatched = squared_error(s.xtx[index], s.xty[index], s.yy[index], identity) / count
            runs.append(
                {
                    "removed": run.removed,
                    "folded_into": run.source,
                    "module": adapter.layer_name(run.source, "mlp") if adapter is not None else None,
                    "fit_tokens": int(s.count[index]),
                    "ridge_lambda": ridge_lambda(s.xtx[index], self.ridge),
                    "fit_error": fitted,
                    "unpatched_error": unpatched,
                    "relative_fit_error": fitted / unpatched if unpatched > 0 else math.nan,
                }
            )
        return {
            "method": "linear",
            "ridge": self.ridge,
            "ridge_meaning": "lambda = ridge x trace(m^T m) / d",
            "fit_tokens": int(self.stats.count[0]) if self.runs else 0,
            "width": self.stats.width,
            "accumulator_bytes": LinearFitStats.bytes_needed(len(self.runs), self.stats.width),
            "fitted_on": "unpruned model",
            "runs": runs,
        }


def fit_linear_patch(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    removed: list[int],
    ridge: float = 0.0,
    progress: bool = True,
) -> LinearPatch:
    """Fit one map per removed run on the *unpruned* ``model`` (not changed); checks memory first."""
    adapter = check_patchable(model)
    runs = plan_runs(removed, adapter.num_layers)
    width = output_width(adapter.site_module(runs[0].source, "mlp"), adapter.spec.mlp_down_layout)
    batches = list(batches)
    check_fit_memory(len(runs), width, largest_batch(batches), execution_device(model))
    pairs = [(run.source, run.last) for run in runs]
    stats = collect_linear_fit_distributed(model, batches, pairs=pairs, width=width, progress=progress)
    maps = [solve_linear_map(stats.xtx[i], stats.xty[i], ridge) for i in range(len(runs))]
    return LinearPatch(runs, maps, stats, ridge)


@torch.no_grad()
def apply_linear_patch(model: nn.Module, patch: LinearPatch) -> None:
    """Fold each run's map into the down projection of the block before it (original numbering: call this
    before the run is removed)."""
    adapter = get_adapter(model)
    for run, map_ in zip(patch.runs, patch.maps, strict=True):
        down = adapter.site_module(run.source, "mlp")
        weight, bias = fold_linear_map(down.weight, down.bias, map_, adapter.spec.mlp_down_layout)
        down.weight.copy_(weight)
        if bias is not None:
            down.bias.copy_(bias)


def linear_patch(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    removed: list[int],
    ridge: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit and fold the maps for removing ``removed`` from the unpruned ``model``; returns the record.

    Call it before :func:`avss.adapters.remove_layers`; the model then still has every block, with the maps
    folded into the blocks before the runs.
    """
    patch = fit_linear_patch(model, batches, removed, ridge, progress)
    adapter = get_adapter(model)
    record = patch.record(adapter)
    apply_linear_patch(model, patch)
    return record
