"""The healing methods, registered by name in :data:`HEAL_METHODS`: each turns a pruned model into an
:class:`Objective` (the module to train, which of its parameters move, a loss on a batch), so the shared
training loop (:func:`avss.training.train`) never asks which method it runs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from avss.adapters import get_adapter, insert_blocks
from avss.errors import HealConfigError
from avss.healing.replace import ReplacementStudents, SpanTeacher, plan_replacements
from avss.pruning.rules import contiguous_spans, kept_layers
from avss.training import ParamPredicate, lora_module_names, prefix_selector, substring_selector

if TYPE_CHECKING:
    from avss.healing.heal import HealConfig

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


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


def call_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss of a module whose forward pass returns its own loss (:class:`ReplacementStudents`)."""
    return model(batch)


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
