"""A small, reusable training loop: any loss, any subset of parameters, resumable and measurable.

``train(model, loss_fn, batches, trainable=...)`` freezes every parameter the ``trainable`` predicate rejects,
optimizes the rest with AdamW (with gradient accumulation, gradient clipping and bf16 autocast), writes
an atomic checkpoint after every epoch, resumes from it, stops early when the validation loss stops improving
and restores the best epoch's weights. It knows nothing about what the loss means, so mitigation (EAVSS) and
healing after pruning share it.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from avss.adapters import get_adapter
from avss.errors import CheckpointError, HealConfigError, OptionError
from avss.io import atomic_write
from avss.progress import track

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
ParamPredicate = Callable[[str, nn.Parameter], bool]
CHECKPOINT_FILE = "checkpoint.pt"
# Modules LoRA can adapt: GPT-2's projections are transformers' Conv1D, not nn.Linear.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
AutocastMode = Literal["auto", "bf16", "off"]
AUTOCAST_MODES: tuple[str, ...] = get_args(AutocastMode)


def check_autocast(mode: str) -> None:
    """Refuse an autocast mode that is none of :data:`AUTOCAST_MODES`, before any model is loaded."""
    if mode not in AUTOCAST_MODES:
        raise OptionError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {mode!r}")


@dataclass
class TrainConfig:
    """Settings; ``patience`` = epochs without validation improvement before stopping (None: never).

    ``autocast`` runs forward passes in bfloat16 while the weights and optimizer stay float32: ``auto`` on a
    GPU that supports bfloat16 only, ``bf16`` on any device (on a CPU with native bfloat16 arithmetic, 2.0x
    faster than float32 measured on AVX512-BF16, ``benchmarks/autocast_smollm2``; elsewhere emulated and
    slower), ``off`` never.
    """

    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    patience: int | None = 1
    autocast: AutocastMode = "auto"
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Reject settings no run can use before a model is loaded or a step is taken."""
        if self.epochs < 1 or self.grad_accum < 1:
            raise OptionError(
                f"epochs and grad_accum must be at least 1, got {self.epochs}, {self.grad_accum}"
            )
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise OptionError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise OptionError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.patience is not None and self.patience < 1:
            raise OptionError(f"patience must be at least 1 or None, got {self.patience}")
        check_autocast(self.autocast)


@dataclass
class TrainResult:
    """What happened: per-epoch losses, the epoch kept, time and memory."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    epochs_run: int = 0
    steps: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    trainable_parameters: int = 0
    total_parameters: int = 0
    optimizer_state_bytes: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    wall_time_s: float = 0.0
    # The dtype forward passes ran in under autocast ("bfloat16"), None without it: ``config`` holds the mode.
    autocast_dtype: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_trainable(model: nn.Module, trainable: ParamPredicate) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` from the predicate and return the trainable parameters by name."""
    selected = {}
    for name, param in model.named_parameters():
        param.requires_grad_(bool(trainable(name, param)))
        if param.requires_grad:
            selected[name] = param
    if not selected:
        raise ValueError("the parameter selector chose no parameters to train")
    return selected


def prefix_selector(prefixes: Sequence[str]) -> ParamPredicate:
    """Train the parameters under any of the module paths ``prefixes`` (e.g. ``model.layers.3``)."""
    dotted = tuple(f"{prefix}." for prefix in prefixes)
    return lambda name, param: name.startswith(dotted)


def substring_selector(marker: str) -> ParamPredicate:
    """Train the parameters whose name contains ``marker`` (e.g. ``lora_`` for adapter weights)."""
    return lambda name, param: marker in name


HALF_DTYPES = (torch.bfloat16, torch.float16)


def half_precision_warning(params: dict[str, nn.Parameter]) -> str | None:
    """A warning when trainable weights are stored in 16 bits: AdamW adds about ``lr`` to each weight per
    step, and below the weight's spacing (2.4e-4 for bfloat16 near 0.05) the addition rounds away, so a run
    at ``lr=1e-4`` can train nothing. Autocast keeps the speed with float32 weights."""
    half = sorted({str(p.dtype).removeprefix("torch.") for p in params.values() if p.dtype in HALF_DTYPES})
    if not half:
        return None
    return (
        f"training {'/'.join(half)} weights directly: updates smaller than their resolution are lost; "
        "load the model with --dtype float32 (--autocast bf16 keeps the speed)"
    )


def autocast_enabled(mode: AutocastMode, device: torch.device) -> bool:
    """Whether ``mode`` (see :class:`TrainConfig`) runs bfloat16 autocast on ``device``."""
    if mode == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return mode == "bf16"


def _autocast(device: torch.device, mode: AutocastMode) -> Any:
    enabled = autocast_enabled(mode, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


PROC_STATUS = Path("/proc/self/status")


def _reset_peak_memory(device: torch.device) -> None:
    """Start peak-memory measurement now, so several runs in one process are measured separately.

    On Linux, writing 5 to ``/proc/self/clear_refs`` resets the process's peak RSS (VmHWM).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    if PROC_STATUS.is_file():
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process peak RSS since training started (VmHWM)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(peak * scale), "process peak RSS"


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], autocast: AutocastMode = "auto"
) -> float:
    """Mean of ``loss_fn`` over ``batches`` in eval mode (no dropout, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with _autocast(device, autocast):
            losses = [float(loss_fn(model, batch)) for batch in batches]
    finally:
        model.train(was_training)
    return sum(losses) / max(len(losses), 1)


class Checkpoint:
    """Trainable weights (current and best epoch), optimizer state and history after an epoch, in one file
    written atomically, so an interrupted run resumes from the last finished epoch."""

    def __init__(self, directory: str | Path | None):
        self.path = Path(directory) / CHECKPOINT_FILE if directory is not None else None

    def save(
        self,
        params: dict[str, nn.Parameter],
        best: dict[str, torch.Tensor] | None,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> None:
        if self.path is None:
            return
        payload = {
            "params": {name: p.detach().cpu() for name, p in params.items()},
            "best": None if best is None else {name: value.cpu() for name, value in best.items()},
            "optimizer": optimizer.state_dict(),
            "state": state,
            "rng": torch.get_rng_state(),
        }
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:  # tensors, numbers and containers only: no pickled code runs (the project refuses pickles)
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: torch raises several unrelated types
            raise CheckpointError(
                f"training checkpoint {self.path} is unreadable ({type(exc).__name__}); "
                "delete it to start over"
            ) from exc


def train(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    trainable: ParamPredicate,
    val_batches: Sequence[Batch] | None = None,
    config: TrainConfig | None = None,
) -> TrainResult:
    """Train the parameters ``trainable`` selects to minimize ``loss_fn(model, batch)`` over ``batches``.

    Each optimizer step averages ``grad_accum`` batches. With ``val_batches`` the validation loss is measured
    before training and after every epoch; the weights of the best epoch are kept, and training stops after
    ``patience`` epochs without improvement. The model is left in eval mode.
    """
    config = config or TrainConfig()
    if config.epochs < 1 or config.grad_accum < 1:
        raise ValueError("epochs and grad_accum must be at least 1")
    started = time.perf_counter()
    device = next(model.parameters()).device
    _reset_peak_memory(device)
    torch.manual_seed(config.seed)
    params = set_trainable(model, trainable)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    checkpoint = Checkpoint(config.checkpoint_dir)
    result = TrainResult(
        trainable_parameters=sum(p.numel() for p in params.values()),
        total_parameters=sum(p.numel() for p in model.parameters()),
        config=asdict(config),
        autocast_dtype="bfloat16" if autocast_enabled(config.autocast, device) else None,
    )
    if (warning := half_precision_warning(params)) is not None:
        result.warnings.append(warning)
    start_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_val = math.inf
    saved = checkpoint.load() if config.resume else None
    if saved is not None:
        with torch.no_grad():
            for name, value in saved["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
        result.train_loss, result.val_loss = state["train_loss"], state["val_loss"]
        result.steps, result.best_epoch = state["steps"], state["best_epoch"]
        best_val, start_epoch = state["best_val"], state["epoch"]
        best_state = saved["best"]
        result.resumed_from_epoch = result.epochs_run = start_epoch
    elif val_batches:
        best_val = evaluate_loss(model, loss_fn, val_batches, config.autocast)
        result.val_loss.append(best_val)
        result.best_epoch = 0
        best_state = {n: p.detach().clone() for n, p in params.items()}

    for epoch in range(start_epoch + 1, config.epochs + 1):
        if (
            result.best_epoch is not None
            and config.patience is not None
            and epoch - result.best_epoch > config.patience
        ):
            result.stopped_early = True
            break
        model.train()
        total, optimizer_steps = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(
            track(batches, f"training epoch {epoch}/{config.epochs}", enabled=config.progress)
        ):
            with _autocast(device, config.autocast):
                loss = loss_fn(model, batch)
            (loss / config.grad_accum).backward()
            total += float(loss.detach())
            if (index + 1) % config.grad_accum == 0 or index + 1 == len(batches):
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                optimizer_steps += 1
        result.steps += optimizer_steps
        result.train_loss.append(total / max(len(batches), 1))
        result.epochs_run = epoch
        if val_batches:
            val = evaluate_loss(model, loss_fn, val_batches, config.autocast)
            result.val_loss.append(val)
            if val < best_val:
                best_val, result.best_epoch = val, epoch
                best_state = {n: p.detach().clone() for n, p in params.items()}
        else:
            result.best_epoch = epoch
        checkpoint.save(
            params,
            best_state,
            optimizer,
            {
                "epoch": epoch,
                "train_loss": result.train_loss,
                "val_loss": result.val_loss,
                "steps": result.steps,
                "best_epoch": result.best_epoch,
                "best_val": best_val,
            },
        )
    if best_state is not None and result.best_epoch != result.epochs_run:
        with torch.no_grad():
            for name, value in best_state.items():
                params[name].copy_(value)
    model.eval()
    result.optimizer_state_bytes = _optimizer_state_bytes(optimizer)
    result.peak_memory_bytes, result.peak_memory_kind = _peak_memory(device)
    result.wall_time_s = round(time.perf_counter() - started, 3)
    return result


def lora_module_names(model: nn.Module, layers: list[int], targets: tuple[str, ...] | None) -> list[str]:
    """Full names of the linear modules in blocks ``layers`` whose last name component is a target
    (every linear module of those blocks for ``None`` or ``all-linear``)."""
    adapter = get_adapter(model)
    every = targets is None or targets == ("all-linear",)
    names = []
    for layer in layers:
        prefix = adapter.layer_name(layer)
        for name, module in adapter.blocks[layer].named_modules():
            if isinstance(module, LINEAR_TYPES) and (every or name.rpartition(".")[2] in targets):
                names.append(f"{prefix}.{name}")
    if not names:
        raise HealConfigError(f"no linear module named {', '.join(targets or ())} in blocks {layers}")
    return names
