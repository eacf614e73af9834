"""Healing after pruning: a short training step that recovers part of what the removed blocks took.

Three methods, registered by name in :data:`HEAL_METHODS`:

- ``lora``: LoRA adapters (peft) on the kept blocks next to each removed span, trained with the LM loss
  (Gromov et al.; Shortened LLaMA). The adapter can be merged into a plain model or saved beside it.
- ``full``: plain fine-tuning of the same neighbouring blocks with the LM loss.
- ``replace``: one new decoder block per contiguous removed span (LLM-Streamline). It is a copy of the
  block before the span (the block after it when the span starts at 0), trained by MSE to map the
  *original* model's hidden state entering the span to the one leaving it, and then inserted where the span
  was, so the healed model is a standard architecture with one block per span.

Each method turns a pruned model into an :class:`Objective` (the parameters to train and a loss on a batch);
the training loop only ever sees objectives. :func:`heal_in_memory` works on a model already in memory (the
study calls it); :func:`heal` reads a pruned directory, heals, and saves with provenance.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from avss import __version__
from avss.adapters import block_input, first_tensor, get_adapter
from avss.data import TextSource, tokenize_texts
from avss.errors import AvssError, DataError, PruneConfigError
from avss.io import atomic_directory, check_output_dir, to_json
from avss.progress import track
from avss.prune import PROVENANCE_FILE

HEALING_FILE = "avss_healing.json"
ADAPTER_DIR = "adapter"
EVALUATION_FILES = ("wiki.test.raw", "test.tokens.txt")
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)  # GPT-2 projections are Conv1D

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]


class HealConfigError(AvssError):
    """The requested healing is impossible (unknown method, no pruning record, ...)."""


# --- configuration and results


@dataclass
class HealConfig:
    """How to heal: the method, its training budget, and the method-specific knobs.

    ``learning_rate=None`` uses the method's default. ``neighbours`` is how many kept blocks on each side of
    a removed span ``lora`` and ``full`` train. ``target_modules=None`` takes peft's table for the
    architecture, or every linear layer of the block where peft has no entry; ``("all-linear",)`` asks for
    every linear layer explicitly.
    """

    method: str = "lora"
    steps: int = 200
    learning_rate: float | None = None
    batch_size: int = 4
    max_length: int = 128
    samples: int | None = None
    validation_samples: int = 16
    eval_every: int = 50
    patience: int | None = None
    weight_decay: float = 0.0
    gradient_accumulation: int = 1
    seed: int = 0
    neighbours: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    merge: bool = True

    def train_samples(self) -> int:
        """Enough training windows that ``steps`` optimizer steps see each window about once."""
        if self.samples is not None:
            return self.samples
        return self.steps * self.batch_size * self.gradient_accumulation


@dataclass
class TrainingReport:
    """What a training run measured: losses, time, memory and how it stopped."""

    steps: int
    initial_train_loss: float
    final_train_loss: float
    initial_validation_loss: float
    final_validation_loss: float
    best_validation_loss: float
    validation_history: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0


@dataclass
class HealingRecord:
    """Provenance written beside a healed model as ``avss_healing.json``."""

    method: str
    config: dict[str, Any]
    pruning: dict[str, Any]
    trained_layers: list[int]
    inserted_layers: list[int]
    trainable_parameters: int
    data: dict[str, Any]
    num_train_sequences: int
    num_train_tokens: int
    num_validation_sequences: int
    training: dict[str, Any]
    teacher_model: dict[str, Any] | None = None
    merged: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    avss_version: str = __version__


@dataclass
class HealResult:
    """The healed model (a ``PeftModel`` when LoRA is left unmerged) and its provenance."""

    model: nn.Module
    record: HealingRecord


# --- where the removed layers were (pure functions of layer indices) ------------------------------------


def contiguous_spans(removed: list[int]) -> list[tuple[int, int]]:
    """Inclusive ``(first, last)`` runs of consecutive removed layer indices, in order."""
    spans: list[tuple[int, int]] = []
    for layer in sorted(set(removed)):
        if spans and layer == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], layer)
        else:
            spans.append((layer, layer))
    return spans


def kept_layers(removed: list[int], original_num_layers: int) -> list[int]:
    gone = set(removed)
    kept = [layer for layer in range(original_num_layers) if layer not in gone]
    if not kept or any(not 0 <= layer < original_num_layers for layer in gone):
        raise PruneConfigError(
            f"removed layers {sorted(gone)} do not fit a {original_num_layers}-layer model"
        )
    return kept


def neighbour_layers(removed: list[int], original_num_layers: int, width: int = 1) -> list[int]:
    """Indices, in the *pruned* model, of the ``width`` kept blocks on each side of every removed span."""
    kept = kept_layers(removed, original_num_layers)
    position = {layer: index for index, layer in enumerate(kept)}
    chosen: set[int] = set()
    for first, last in contiguous_spans(removed):
        before = [layer for layer in kept if layer < first][-width:] if width else []
        after = [layer for layer in kept if layer > last][:width]
        chosen.update(position[layer] for layer in before + after)
    return sorted(chosen)


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


# --- losses


def lm_labels(batch: Batch) -> torch.Tensor:
    """Next-token labels with padding ignored (-100), as Hugging Face causal LMs expect."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def lm_loss(model: nn.Module) -> LossFn:
    def loss(batch: Batch) -> torch.Tensor:
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=lm_labels(batch),
            use_cache=False,
        ).loss

    return loss


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real tokens (``mask`` 1) and all channels."""
    weights = mask.to(prediction.dtype).unsqueeze(-1)
    squared = (prediction.float() - target.float()).pow(2) * weights
    return squared.sum() / (weights.sum() * prediction.shape[-1]).clamp_min(1)


# --- method: replacement blocks trained on the original model's hidden states ----------------------------


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


def replacement_loss(teacher: SpanTeacher, students: list[nn.Module]) -> LossFn:
    """Mean over spans of the masked MSE between ``student(h_in)`` and the original ``h_out``."""

    def loss(batch: Batch) -> torch.Tensor:
        captured = teacher.capture(batch)
        losses = []
        for plan, student in zip(teacher.plans, students, strict=True):
            args, kwargs = captured["call", plan.template]
            args, kwargs = _with_hidden(args, kwargs, captured["input", plan.first])
            prediction = first_tensor(student(*args, **kwargs))
            losses.append(masked_mse(prediction, captured["output", plan.last], batch["attention_mask"]))
        return torch.stack(losses).mean()

    return loss


def insert_blocks(model: nn.Module, insertions: list[tuple[int, nn.Module, int]]) -> None:
    """Insert blocks into ``model``'s block list and update every depth-dependent config field.

    Each insertion is ``(index in the new list, block, existing block whose per-layer config values it
    takes)``. The blocks are appended and the list is then reordered with :meth:`LayerAdapter.keep_layers`,
    which already knows how to rewrite the layer count, per-layer fields and ``layer_idx``.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks
    count = len(blocks)
    order = list(range(count))
    config = model.config
    per_layer = {
        name: getattr(config, name)
        for name in adapter.spec.per_layer_fields
        if isinstance(getattr(config, name, None), list) and len(getattr(config, name)) == count
    }
    for offset, (index, block, like) in enumerate(sorted(insertions, key=lambda item: item[0])):
        blocks.append(block)
        for values in per_layer.values():
            values.append(values[like])
        order.insert(index, count + offset)
    adapter.keep_layers(order)


# --- methods


@dataclass
class Objective:
    """What to train: the model being healed, the parameters the optimizer updates, and the loss."""

    model: nn.Module
    parameters: list[nn.Parameter]
    loss: LossFn
    trained_layers: list[int]
    finish: Callable[[], nn.Module]
    teacher_source: dict[str, Any] | None = None
    inserted_layers: list[int] = field(default_factory=list)


@dataclass
class HealContext:
    """Everything a method may need besides the pruned model and the config."""

    removed: list[int]
    original_num_layers: int
    teacher: nn.Module | None = None
    teacher_source: dict[str, Any] | None = None


def _freeze(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def default_target_modules(model_type: str) -> tuple[str, ...] | None:
    """peft's own per-architecture LoRA targets; ``None`` where peft has no entry."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return tuple(targets) if targets else None


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


def prepare_lora(model: nn.Module, config: HealConfig, context: HealContext) -> Objective:
    from peft import LoraConfig, get_peft_model

    layers = neighbour_layers(context.removed, context.original_num_layers, config.neighbours)
    targets = config.target_modules or default_target_modules(model.config.model_type)
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=lora_module_names(model, layers, targets),
    )
    peft_model = get_peft_model(model, lora_config)
    parameters = [p for p in peft_model.parameters() if p.requires_grad]

    def finish() -> nn.Module:
        peft_model.eval()
        return peft_model.merge_and_unload() if config.merge else peft_model

    return Objective(peft_model, parameters, lm_loss(peft_model), layers, finish)


def prepare_full(model: nn.Module, config: HealConfig, context: HealContext) -> Objective:
    layers = neighbour_layers(context.removed, context.original_num_layers, config.neighbours)
    _freeze(model)
    blocks = get_adapter(model).blocks
    parameters = [p for layer in layers for p in blocks[layer].parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)

    def finish() -> nn.Module:
        _freeze(model)
        return model.eval()

    return Objective(model, parameters, lm_loss(model), layers, finish)


def prepare_replace(model: nn.Module, config: HealConfig, context: HealContext) -> Objective:
    if context.teacher is None:
        raise HealConfigError("method 'replace' needs the original (unpruned) model as teacher")
    teacher = context.teacher.eval()
    _freeze(teacher)
    _freeze(model)
    plans = plan_replacements(context.removed, context.original_num_layers)
    teacher_blocks = get_adapter(teacher).blocks
    if len(teacher_blocks) != context.original_num_layers:
        raise HealConfigError(
            f"the teacher has {len(teacher_blocks)} blocks but the pruning record says "
            f"{context.original_num_layers}; pass the model that was pruned"
        )
    students = [copy.deepcopy(teacher_blocks[plan.template]).train() for plan in plans]
    parameters = [p for student in students for p in student.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    kept = kept_layers(context.removed, context.original_num_layers)
    position = {layer: index for index, layer in enumerate(kept)}

    def finish() -> nn.Module:
        for student in students:
            student.eval()
        insert_blocks(
            model,
            [
                (plan.insert_at, student, position[plan.template])
                for plan, student in zip(plans, students, strict=True)
            ],
        )
        _freeze(model)
        return model.eval()

    return Objective(
        model,
        parameters,
        replacement_loss(SpanTeacher(teacher, plans), students),
        [plan.insert_at for plan in plans],
        finish,
        teacher_source=context.teacher_source,
        inserted_layers=[plan.insert_at for plan in plans],
    )


@dataclass(frozen=True)
class HealMethod:
    """A registered healing method: how to build its objective and its default learning rate."""

    name: str
    prepare: Callable[[nn.Module, HealConfig, HealContext], Objective]
    learning_rate: float
    needs_teacher: bool = False
    description: str = ""


HEAL_METHODS: dict[str, HealMethod] = {
    method.name: method
    for method in (
        HealMethod("lora", prepare_lora, 1e-3, description="LoRA on the blocks next to each removed span"),
        HealMethod("full", prepare_full, 5e-5, description="fine-tune the blocks next to each removed span"),
        HealMethod(
            "replace",
            prepare_replace,
            1e-4,
            needs_teacher=True,
            description="one new block per removed span, trained by MSE on the original hidden states",
        ),
    )
}


def get_heal_method(name: str) -> HealMethod:
    try:
        return HEAL_METHODS[name]
    except KeyError:
        raise HealConfigError(
            f"unknown healing method {name!r}; choose one of {', '.join(HEAL_METHODS)}"
        ) from None


# --- training


def split_batches(batches: list[Batch], validation: int) -> tuple[list[Batch], list[Batch]]:
    """Hold out the first batches (at least ``validation`` sequences) for early stopping."""
    held, taken = 0, 0
    while held < len(batches) - 1 and taken < validation:
        taken += batches[held]["input_ids"].shape[0]
        held += 1
    return batches[held:], batches[:held]


@torch.no_grad()
def mean_loss(loss: LossFn, batches: list[Batch]) -> float:
    """Mean of the per-batch losses weighted by real tokens."""
    total, weight = 0.0, 0
    for batch in batches:
        tokens = int(batch["attention_mask"].sum())
        total += float(loss(batch)) * tokens
        weight += tokens
    return total / max(weight, 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def train_objective(
    objective: Objective,
    train: list[Batch],
    validation: list[Batch],
    config: HealConfig,
    learning_rate: float,
    progress: bool = True,
) -> TrainingReport:
    """AdamW on the objective's parameters for ``config.steps`` optimizer steps, cycling over ``train``;
    validation loss every ``eval_every`` steps, stopping after ``patience`` evaluations without a new best
    and restoring the best parameters."""
    device = objective.parameters[0].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(objective.parameters, lr=learning_rate, weight_decay=config.weight_decay)
    objective.model.eval()
    initial_validation = mean_loss(objective.loss, validation)
    initial_train = mean_loss(objective.loss, train[: max(1, len(validation))])
    best = initial_validation
    best_state = [p.detach().clone() for p in objective.parameters]
    history: list[tuple[int, float]] = [(0, initial_validation)]
    stale, stopped_early, step, recent = 0, False, 0, []
    schedule = (train[i % len(train)] for i in range(config.steps * config.gradient_accumulation))
    objective.model.train()
    for index, batch in enumerate(
        track(schedule, "healing", total=config.steps * config.gradient_accumulation, enabled=progress)
    ):
        loss = objective.loss(batch)
        (loss / config.gradient_accumulation).backward()
        recent.append(float(loss.detach()))
        if (index + 1) % config.gradient_accumulation:
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % config.eval_every and step != config.steps:
            continue
        objective.model.eval()
        current = mean_loss(objective.loss, validation)
        objective.model.train()
        history.append((step, current))
        if current < best:
            best, stale = current, 0
            best_state = [p.detach().clone() for p in objective.parameters]
        else:
            stale += 1
            if config.patience is not None and stale >= config.patience:
                stopped_early = True
                break
    with torch.no_grad():
        for parameter, saved in zip(objective.parameters, best_state, strict=True):
            parameter.copy_(saved)
    objective.model.eval()
    window = recent[-max(1, len(train)) :]
    return TrainingReport(
        steps=step,
        initial_train_loss=initial_train,
        final_train_loss=sum(window) / len(window) if window else math.nan,
        initial_validation_loss=initial_validation,
        final_validation_loss=history[-1][1],
        best_validation_loss=best,
        validation_history=history,
        stopped_early=stopped_early,
        wall_time_s=round(time.perf_counter() - started, 3),
        peak_memory_mb=round(peak_memory_mb(device), 1),
    )


# --- entry points


def check_training_source(source: TextSource) -> None:
    """Refuse to train on the evaluation texts the benchmarks score (WikiText-2 test, bundled evaluation)."""
    if source.data and Path(source.data).name in EVALUATION_FILES:
        raise DataError(
            f"{source.data} is an evaluation split; heal on other text (e.g. --data-dir for WikiText-2 valid)"
        )
    if not (source.data or source.dataset or source.data_dir) and source.bundled == "evaluation":
        raise DataError("the bundled 'evaluation' corpus is held apart for evaluation; heal on 'calibration'")


def heal_in_memory(
    model: nn.Module,
    tokenizer: Any,
    removed_layers: list[int],
    texts: list[str],
    config: HealConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    teacher_source: dict[str, Any] | None = None,
    pruning: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    progress: bool = True,
) -> HealResult:
    """Heal a pruned model in memory (the model is modified in place and returned in the result).

    ``removed_layers`` are original indices; the original depth is the current depth plus their number.
    ``teacher`` is the unpruned model, needed by ``replace`` only.
    """
    config = config or HealConfig()
    method = get_heal_method(config.method)
    if config.steps < 1:
        raise HealConfigError(f"--steps must be at least 1, got {config.steps}")
    if not removed_layers:
        raise HealConfigError("nothing was removed from this model, so there is nothing to heal")
    original = get_adapter(model).num_layers + len(removed_layers)
    torch.manual_seed(config.seed)
    batches = tokenize_texts(
        tokenizer,
        texts,
        samples=config.train_samples() + config.validation_samples,
        max_length=config.max_length,
        batch_size=config.batch_size,
        seed=config.seed,
    ).batches
    device = next(model.parameters()).device
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    train, validation = split_batches(batches, config.validation_samples)
    context = HealContext(sorted(removed_layers), original, teacher, teacher_source)
    objective = method.prepare(model, config, context)
    learning_rate = config.learning_rate if config.learning_rate is not None else method.learning_rate
    report = train_objective(objective, train, validation, config, learning_rate, progress=progress)
    healed = objective.finish()
    record = HealingRecord(
        method=method.name,
        config={**asdict(config), "learning_rate": learning_rate},
        pruning=pruning or {"removed_layers": sorted(removed_layers), "original_num_layers": original},
        trained_layers=objective.trained_layers,
        inserted_layers=objective.inserted_layers,
        trainable_parameters=sum(p.numel() for p in objective.parameters),
        data=data or {"kind": "texts", "count": len(texts)},
        num_train_sequences=sum(b["input_ids"].shape[0] for b in train),
        num_train_tokens=int(sum(b["attention_mask"].sum() for b in train)),
        num_validation_sequences=sum(b["input_ids"].shape[0] for b in validation),
        training=asdict(report),
        teacher_model=objective.teacher_source,
        merged=config.method != "lora" or config.merge,
    )
    return HealResult(healed, record)


def read_pruning_record(pruned_dir: str | Path) -> dict[str, Any]:
    path = Path(pruned_dir) / PROVENANCE_FILE
    if not path.is_file():
        raise HealConfigError(
            f"{pruned_dir} has no {PROVENANCE_FILE}; heal a directory written by `avss prune`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def teacher_spec(source_model: dict[str, Any]) -> str:
    """The ``load_model`` argument that reloads the model a pruning record names."""
    if source_model.get("kind") == "embedded":
        return str(source_model["name"])
    if source_model.get("kind") == "hub":
        return str(source_model["id"])
    return str(source_model["path"])


def save_healed(
    result: HealResult,
    tokenizer: Any,
    out: str | Path,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a healed model atomically: a plain model, or (unmerged LoRA) the adapter folder pointing at
    ``base_dir`` plus a copy of the pruning record, with ``avss_healing.json`` either way."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if result.record.merged:
            result.model.save_pretrained(tmp, safe_serialization=True)
        else:
            if base_dir is None:
                raise HealConfigError(
                    "an unmerged LoRA adapter needs the pruned model directory it applies to"
                )
            result.model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
            result.model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / HEALING_FILE).write_text(to_json(asdict(result.record)), encoding="utf-8")
    return Path(out)


def heal(
    pruned_dir: str | Path,
    out: str | Path,
    config: HealConfig | None = None,
    source: TextSource | None = None,
    *,
    teacher: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> HealResult:
    """Heal the pruned model in ``pruned_dir`` and save it to ``out`` (see :func:`heal_in_memory`).

    ``teacher`` overrides the original model named in the pruning record (``replace`` only).
    """
    from avss.models import load_model
    from avss.pipeline import package_versions

    config = config or HealConfig()
    method = get_heal_method(config.method)
    source = source or TextSource()
    check_training_source(source)
    check_output_dir(out, overwrite)
    pruning = read_pruning_record(pruned_dir)
    loaded = load_model(str(pruned_dir), device=device, dtype=dtype)
    teacher_loaded = None
    if method.needs_teacher:
        teacher_loaded = load_model(
            teacher or teacher_spec(pruning["source_model"]), device=device, dtype=dtype
        )
    result = heal_in_memory(
        loaded.model,
        loaded.tokenizer,
        pruning["removed_layers"],
        source.load(),
        config,
        teacher=teacher_loaded.model if teacher_loaded else None,
        teacher_source=teacher_loaded.source if teacher_loaded else None,
        pruning=pruning,
        data=source.describe(),
        progress=progress,
    )
    result.record.options = {"pruned_model": loaded.source, "versions": package_versions()}
    save_healed(result, loaded.tokenizer, out, base_dir=pruned_dir, overwrite=overwrite)
    return result
