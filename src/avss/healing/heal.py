"""Healing after pruning: a short training step that recovers part of what the removed blocks took.

Three methods, registered by name in :data:`HEAL_METHODS`:

- ``lora``: LoRA adapters (peft) on the kept blocks next to each removed span, trained with the LM loss
  (Gromov et al.; Shortened LLaMA). The adapter can be merged into a plain model or saved beside it.
- ``full``: plain fine-tuning of the same neighbouring blocks with the LM loss.
- ``replace``: one new decoder block per contiguous removed span (LLM-Streamline). It is a copy of the
  block before the span (the block after it when the span starts at 0), trained by MSE to map the
  *original* model's hidden state entering the span to the one leaving it, and then inserted where the span
  was, so the healed model is a standard architecture with one block per span.

Each method turns a pruned model into an :class:`Objective` (the module to train, which of its parameters
move, a loss on a batch); :func:`avss.training.train` only ever sees objectives, so checkpoints, resume and
early stopping on a validation split are the shared loop's. :func:`heal_in_memory` works on a model already
in memory (the study calls it); :func:`heal` reads a pruned directory, heals, and saves with provenance;
:func:`save_or_heal` is ``avss prune --heal``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avss.adapters import block_input, first_tensor, get_adapter
from avss.data import TextSource, tokenize_texts
from avss.errors import DataError, HealConfigError, PruneConfigError
from avss.io import atomic_directory, check_output_dir, to_json
from avss.models import LoadedModel, load_model
from avss.provenance import Provenance
from avss.pruning.prune import PROVENANCE_FILE, READABLE_PRUNING_FORMATS, PruneResult, save_pruned
from avss.pruning.rules import contiguous_spans
from avss.stats.checkpoint import checkpoint_dir
from avss.training import (
    ParamPredicate,
    TrainConfig,
    lora_module_names,
    prefix_selector,
    substring_selector,
    train,
)

HEALING_FILE = "avss_healing.json"
# Version 2 carries the provenance at the top level; untagged files (version 1) kept ``versions`` under
# ``options``.
HEALING_FORMAT = "avss-healing/2"
EVALUATION_FILES = ("wiki.test.raw", "test.tokens.txt")

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


# --- configuration and results


@dataclass
class HealConfig:
    """How to heal: the method, its training budget, and the method-specific knobs.

    ``steps`` optimizer steps are split over ``epochs`` passes over the same training windows; the validation
    loss is measured and a checkpoint written after each epoch, and the best epoch's weights are kept
    (:func:`avss.training.train`). ``learning_rate=None`` uses the method's default. ``neighbours`` is how
    many kept blocks on each side of a removed span ``lora`` and ``full`` train. ``target_modules=None``
    takes peft's table for the architecture, or every linear layer of the block where peft has no entry;
    ``("all-linear",)`` asks for every linear layer explicitly.
    """

    method: str = "lora"
    steps: int = 200
    learning_rate: float | None = None
    batch_size: int = 4
    max_length: int = 128
    epochs: int = 2
    validation_samples: int = 16
    patience: int | None = 1
    weight_decay: float = 0.0
    gradient_accumulation: int = 1
    seed: int = 0
    neighbours: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    merge: bool = True
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        get_heal_method(self.method)

    def train_samples(self) -> int:
        """Training windows per epoch: enough for ``steps / epochs`` optimizer steps."""
        if self.steps < 1 or self.epochs < 1 or self.steps < self.epochs:
            raise HealConfigError(f"need steps >= epochs >= 1, got steps={self.steps}, epochs={self.epochs}")
        return math.ceil(self.steps / self.epochs) * self.batch_size * self.gradient_accumulation


@dataclass
class HealingRecord:
    """How a pruned model was healed, written beside the healed model as ``avss_healing.json``
    (:meth:`to_dict`); ``pruning`` is the record of the pruning it healed."""

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
    provenance: Provenance = field(default_factory=lambda: Provenance.now(HEALING_FORMAT))

    def to_dict(self) -> dict[str, Any]:
        """The ``avss_healing.json`` content: the provenance keys first, then the record."""
        record = asdict(self)
        del record["provenance"]
        return {**self.provenance.to_dict(), **record}


@dataclass
class HealResult:
    """The healed model (a ``PeftModel`` when LoRA is left unmerged) and its provenance."""

    model: nn.Module
    record: HealingRecord


# --- where the removed layers were (pure functions of layer indices) ------------------------------------


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


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The causal LM loss over the batch's real tokens."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=lm_labels(batch),
        use_cache=False,
    ).loss


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


def call_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss of a module whose forward pass returns its own loss (:class:`ReplacementStudents`)."""
    return model(batch)


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
    """What to train: the module the training loop sees, which of its parameters to update, the loss,
    and ``finish``, which turns the trained module into the healed model."""

    model: nn.Module
    trainable: ParamPredicate
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


def default_target_modules(model_type: str) -> tuple[str, ...] | None:
    """peft's own per-architecture LoRA targets; ``None`` where peft has no entry."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return tuple(targets) if targets else None


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

    def finish() -> nn.Module:
        return peft_model.merge_and_unload() if config.merge else peft_model

    return Objective(peft_model, substring_selector("lora_"), lm_loss, layers, finish)


def prepare_full(model: nn.Module, config: HealConfig, context: HealContext) -> Objective:
    layers = neighbour_layers(context.removed, context.original_num_layers, config.neighbours)
    adapter = get_adapter(model)
    selector = prefix_selector([adapter.layer_name(layer) for layer in layers])
    return Objective(model, selector, lm_loss, layers, lambda: model)


def prepare_replace(model: nn.Module, config: HealConfig, context: HealContext) -> Objective:
    if context.teacher is None:
        raise HealConfigError("method 'replace' needs the original (unpruned) model as teacher")
    teacher = context.teacher.eval().requires_grad_(False)
    plans = plan_replacements(context.removed, context.original_num_layers)
    teacher_blocks = get_adapter(teacher).blocks
    if len(teacher_blocks) != context.original_num_layers:
        raise HealConfigError(
            f"the teacher has {len(teacher_blocks)} blocks but the pruning record says "
            f"{context.original_num_layers}; pass the model that was pruned"
        )
    students = ReplacementStudents(
        SpanTeacher(teacher, plans), [copy.deepcopy(teacher_blocks[plan.template]) for plan in plans]
    )
    kept = kept_layers(context.removed, context.original_num_layers)
    position = {layer: index for index, layer in enumerate(kept)}

    def finish() -> nn.Module:
        insertions = [
            (plan.insert_at, student, position[plan.template])
            for plan, student in zip(plans, students.students, strict=True)
        ]
        insert_blocks(model, insertions)
        return model.requires_grad_(False).eval()

    return Objective(
        students,
        lambda name, parameter: True,
        call_loss,
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


def train_config(config: HealConfig, learning_rate: float, progress: bool) -> TrainConfig:
    return TrainConfig(
        epochs=config.epochs,
        lr=learning_rate,
        weight_decay=config.weight_decay,
        grad_accum=config.gradient_accumulation,
        patience=config.patience,
        seed=config.seed,
        checkpoint_dir=config.checkpoint_dir,
        resume=config.resume,
        progress=progress,
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
    train_batches, validation = split_batches(batches, config.validation_samples)
    context = HealContext(sorted(removed_layers), original, teacher, teacher_source)
    objective = method.prepare(model, config, context)
    learning_rate = config.learning_rate if config.learning_rate is not None else method.learning_rate
    report = train(
        objective.model,
        objective.loss,
        train_batches,
        trainable=objective.trainable,
        val_batches=validation,
        config=train_config(config, learning_rate, progress),
    )
    healed = objective.finish()
    record = HealingRecord(
        method=method.name,
        config={**asdict(config), "learning_rate": learning_rate},
        pruning=pruning or {"removed_layers": sorted(removed_layers), "original_num_layers": original},
        trained_layers=objective.trained_layers,
        inserted_layers=objective.inserted_layers,
        trainable_parameters=report.trainable_parameters,
        data=data or {"kind": "texts", "count": len(texts)},
        num_train_sequences=sum(b["input_ids"].shape[0] for b in train_batches),
        num_train_tokens=int(sum(b["attention_mask"].sum() for b in train_batches)),
        num_validation_sequences=sum(b["input_ids"].shape[0] for b in validation),
        training=report.to_dict(),
        teacher_model=objective.teacher_source,
        merged=config.method != "lora" or config.merge,
    )
    return HealResult(healed, record)


def read_pruning_record(pruned_dir: str | Path) -> dict[str, Any]:
    """The pruning record of ``pruned_dir``, of a format this version reads (every one it wrote)."""
    path = Path(pruned_dir) / PROVENANCE_FILE
    if not path.is_file():
        raise HealConfigError(
            f"{pruned_dir} has no {PROVENANCE_FILE}; heal a directory written by `avss prune`"
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") not in READABLE_PRUNING_FORMATS:
        raise HealConfigError(
            f"{path} has format {record.get('format')!r}, written by a newer avss; this version reads "
            f"{', '.join(str(tag) for tag in READABLE_PRUNING_FORMATS if tag)} and untagged records"
        )
    return record


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
    """Save a healed model atomically with ``avss_healing.json``: a plain model that reloads with
    ``from_pretrained``, or, for unmerged LoRA, the peft adapter whose ``base_model_name_or_path`` is the
    pruned model directory ``base_dir`` (reload with ``AutoPeftModelForCausalLM.from_pretrained(out)``)."""
    if not result.record.merged and base_dir is None:
        raise HealConfigError("an unmerged LoRA adapter needs the pruned model directory it applies to")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if not result.record.merged:
            result.model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
        result.model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / HEALING_FILE).write_text(to_json(result.record.to_dict()), encoding="utf-8")
    return Path(out)


def heal_loaded(
    loaded: LoadedModel,
    pruning: dict[str, Any],
    out: str | Path,
    config: HealConfig | None = None,
    source: TextSource | None = None,
    *,
    teacher: str | None = None,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> HealResult:
    """Heal an in-memory pruned model described by the pruning record ``pruning`` and save it to ``out``.

    Checkpoints go to ``config.checkpoint_dir`` (default ``OUT.checkpoint``, removed once the model is
    saved), so an interrupted run continues with ``resume=True``. ``teacher`` overrides the original model
    named in the pruning record (``replace`` only).
    """
    config = config or HealConfig()
    method = get_heal_method(config.method)
    source = source or TextSource()
    check_training_source(source)
    check_output_dir(out, overwrite)
    checkpoints = Path(config.checkpoint_dir or checkpoint_dir(out))
    config = replace(config, checkpoint_dir=str(checkpoints))
    teacher_loaded = None
    if method.needs_teacher:
        device = str(next(loaded.model.parameters()).device)
        teacher_loaded = load_model(
            teacher or teacher_spec(pruning["source_model"]),
            device=device,
            dtype=loaded.source.get("dtype", "auto"),
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
    result.record.options = {"pruned_model": loaded.source}
    save_healed(result, loaded.tokenizer, out, base_dir=base_dir, overwrite=overwrite)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return result


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
    """Heal the pruned model saved in ``pruned_dir`` (by ``avss prune``) and save it to ``out``."""
    pruning = read_pruning_record(pruned_dir)
    check_output_dir(out, overwrite)
    loaded = load_model(str(pruned_dir), device=device, dtype=dtype)
    return heal_loaded(
        loaded,
        pruning,
        out,
        config,
        source,
        teacher=teacher,
        base_dir=pruned_dir,
        overwrite=overwrite,
        progress=progress,
    )


def save_or_heal(
    loaded: LoadedModel,
    result: PruneResult,
    out: str | Path,
    config: HealConfig | None,
    source: TextSource | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """``avss prune [--heal METHOD]``: save the pruned model, or heal it first on ``source`` and save the
    healed model (LoRA merged, since no separate pruned directory exists for an adapter to point at)."""
    if config is None:
        return save_pruned(loaded.model, loaded.tokenizer, out, result.record, overwrite=overwrite)
    pruning = result.record.to_dict()
    heal_loaded(
        loaded, pruning, out, replace(config, merge=True), source, overwrite=overwrite, progress=progress
    )
    return Path(out)
