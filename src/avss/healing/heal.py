"""Healing after pruning: a short training step that recovers part of what the removed blocks took.

Three methods, registered by name in :data:`avss.healing.methods.HEAL_METHODS`:

- ``lora``: LoRA adapters (peft) on the kept blocks next to each removed span, trained with the LM loss
  (Gromov et al.; Shortened LLaMA). The adapter can be merged into a plain model or saved beside it.
- ``full``: plain fine-tuning of the same neighbouring blocks with the LM loss.
- ``replace``: one new decoder block per contiguous removed span (LLM-Streamline). It is a copy of the
  block before the span (the block after it when the span starts at 0), trained by MSE to map the
  *original* model's hidden state entering the span to the one leaving it, and then inserted where the span
  was, so the healed model is a standard architecture with one block per span.

Each method turns a pruned model into an :class:`~avss.healing.methods.Objective` (the module to train,
which of its parameters move, a loss on a batch); :func:`avss.training.train` only ever sees objectives, so
checkpoints, resume and early stopping on a validation split are the shared loop's. :func:`heal_in_memory`
works on a model already in memory (the study calls it); :func:`heal` reads a pruned directory, heals, and
saves with provenance; :func:`save_or_heal` is ``avss prune --heal``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avss.adapters import get_adapter
from avss.data import TextSource, tokenize_texts
from avss.errors import DataError, HealConfigError
from avss.healing.methods import HealContext, get_heal_method
from avss.io import atomic_directory, check_output_dir, to_json
from avss.models import LoadedModel, LoadOptions, load_model
from avss.provenance import Provenance
from avss.pruning.prune import PROVENANCE_FILE, READABLE_PRUNING_FORMATS, PruneResult, save_pruned
from avss.stats.checkpoint import checkpoint_dir
from avss.training import AutocastMode, TrainConfig, check_autocast, train

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
    ``("all-linear",)`` asks for every linear layer explicitly. ``autocast`` is
    :class:`~avss.training.TrainConfig`'s.
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
    autocast: AutocastMode = "auto"

    def __post_init__(self) -> None:
        get_heal_method(self.method)
        check_autocast(self.autocast)

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
        autocast=config.autocast,
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
    loading: LoadOptions | None = None,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> HealResult:
    """Heal an in-memory pruned model described by the pruning record ``pruning`` and save it to ``out``.

    Checkpoints go to ``config.checkpoint_dir`` (default ``OUT.checkpoint``, removed once the model is
    saved), so an interrupted run continues with ``resume=True``. ``teacher`` overrides the original model
    named in the pruning record (``replace`` only); it loads with ``loading`` on the pruned model's device
    and precision.
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
        same_place = replace(
            loading or LoadOptions(),
            device=str(next(loaded.model.parameters()).device),
            dtype=loaded.source.get("dtype", "auto"),
        )
        teacher_loaded = load_model(teacher or teacher_spec(pruning["source_model"]), **asdict(same_place))
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
    loading: LoadOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> HealResult:
    """Heal the pruned model saved in ``pruned_dir`` (by ``avss prune``) and save it to ``out``; ``loading``
    says how it loads and runs (the teacher of ``replace`` follows its device and precision)."""
    pruning = read_pruning_record(pruned_dir)
    check_output_dir(out, overwrite)
    loaded = load_model(str(pruned_dir), **asdict(loading or LoadOptions()))
    return heal_loaded(
        loaded,
        pruning,
        out,
        config,
        source,
        teacher=teacher,
        loading=loading,
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
