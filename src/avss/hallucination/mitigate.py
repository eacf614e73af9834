"""Mitigation: train only the chosen layers (full weights or LoRA) with LM loss + lambda x contrastive loss.

Layer choice strategies register in :data:`SELECTIONS` (``eavss`` top-k, ``lowest`` bottom-k, seeded
``random`` k, ``all``), so the controls of the experiment differ from the method in one name only. The loss
is :class:`ContrastiveObjective`; the optimization is the generic :func:`avss.training.train`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avss.adapters import get_adapter
from avss.errors import MitigationConfigError
from avss.hallucination.batches import contrastive_batches
from avss.hallucination.eavss import EavssScores
from avss.hallucination.losses import (
    CONTRASTS,
    REDUCTIONS,
    answer_logprobs,
    answer_nll,
    infonce,
    logprob_margin,
    masked_mean,
    reduce_logprobs,
)
from avss.hallucination.pairs import Pair, Splitter, describe_pairs, split_of
from avss.io import atomic_directory
from avss.training import (
    TrainConfig,
    TrainResult,
    lora_module_names,
    prefix_selector,
    substring_selector,
    train,
)

PROVENANCE_FILE = "avss_mitigation.json"
# Version 2 carries the provenance once at the top level; untagged files (version 1) had no ``format``,
# ``created``, ``avss_version`` or ``command`` and repeated ``versions`` in every round and evaluation.
MITIGATION_FORMAT = "avss-mitigation/2"


# --- layer selection ----------------------------------------------------------------------------------------

Selection = Callable[[EavssScores | None, int, int, int], list[int]]


def _needs_scores(scores: EavssScores | None, name: str) -> EavssScores:
    if scores is None:
        raise MitigationConfigError(f"layer selection {name!r} needs EAVSS scores")
    return scores


SELECTIONS: dict[str, Selection] = {
    "eavss": lambda scores, k, n, seed: _needs_scores(scores, "eavss").top(k),
    "lowest": lambda scores, k, n, seed: _needs_scores(scores, "lowest").bottom(k),
    "random": lambda scores, k, n, seed: sorted(random.Random(seed).sample(range(n), k)),
    "all": lambda scores, k, n, seed: list(range(n)),
}
SELECTION_ALIASES = {"auto": "eavss"}


def needs_scores(layers: str) -> bool:
    return SELECTION_ALIASES.get(layers, layers) in ("eavss", "lowest")


def given_layers(layers: str) -> list[int] | None:
    """The indices of ``layers`` if it lists them (``"3,7,12"``), None for a strategy name; anything else is a
    :class:`MitigationConfigError`. Needs no model, so a bad value fails before one loads."""
    if SELECTION_ALIASES.get(layers, layers) in SELECTIONS:
        return None
    try:
        chosen = sorted({int(item) for item in layers.split(",") if item.strip()})
    except ValueError:
        known = ", ".join([*SELECTION_ALIASES, *SELECTIONS])
        raise MitigationConfigError(f"--layers {layers!r}: use {known} or comma-separated indices") from None
    if not chosen or min(chosen) < 0:
        raise MitigationConfigError(f"--layers {layers!r}: give one or more indices >= 0")
    return chosen


def choose_layers(
    layers: str, k: int, num_layers: int, scores: EavssScores | None = None, seed: int = 0
) -> list[int]:
    """``layers`` is a strategy name (``auto``/``eavss``, ``lowest``, ``random``, ``all``) or ``"3,7,12"``."""
    chosen = given_layers(layers)
    if chosen is None:
        if not 0 < k <= num_layers:
            raise MitigationConfigError(f"--k must be between 1 and {num_layers}, got {k}")
        return SELECTIONS[SELECTION_ALIASES.get(layers, layers)](scores, k, num_layers, seed)
    if max(chosen) >= num_layers:
        raise MitigationConfigError(f"--layers {layers!r}: indices must be in 0..{num_layers - 1}")
    return chosen


# --- objective ----------------------------------------------------------------------------------------------


def check_contrast(contrast: str, reduction: str) -> None:
    if contrast not in CONTRASTS:
        raise MitigationConfigError(f"unknown --contrast {contrast!r}; choose from {', '.join(CONTRASTS)}")
    if reduction not in REDUCTIONS:
        raise MitigationConfigError(
            f"unknown --logprob-reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}"
        )


@dataclass
class ContrastiveObjective:
    """LM loss on truthful answers + ``lam`` x contrastive loss, on batches from :func:`contrastive_batches`.

    ``infonce`` contrasts mean-pooled answer representations with the question's pooled representation at
    each selected layer (averaged over layers); ``logprob`` pushes the truthful answer's log-likelihood above
    each hallucinated one's, compared as sequence log-likelihoods (``reduction="sum"``, the method's and the
    MC metrics') or as per-token means (``"mean"``, a distinct objective). The LM loss is per-token always.
    """

    layers: list[int]
    contrast: str = "infonce"
    tau: float = 0.1
    lam: float = 0.5
    margin: float = 0.0
    reduction: str = "sum"

    def __post_init__(self) -> None:
        check_contrast(self.contrast, self.reduction)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lm_loss, contrastive = self.terms(model, batch)
        return lm_loss + self.lam * contrastive

    def terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM loss on truthful answers and the (unweighted) contrastive loss."""
        device = next(model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        answer_mask = batch["answer_mask"].to(device)
        group = int(batch["group_size"])
        outputs = model(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=self.contrast == "infonce",
        )
        sums, counts = answer_logprobs(outputs.logits, input_ids, answer_mask)
        nll = -reduce_logprobs(sums, counts, "mean").view(-1, group)
        if self.contrast == "logprob":
            scores = reduce_logprobs(sums, counts, self.reduction).view(-1, group)
            return nll[:, 0].mean(), logprob_margin(scores[:, 0], scores[:, 1:], self.margin)
        prompt_mask = batch["prompt_mask"].to(device)
        per_layer = []
        for layer in self.layers:
            hidden = outputs.hidden_states[layer + 1]
            answers = masked_mean(hidden, answer_mask).view(-1, group, hidden.shape[-1])
            query = masked_mean(hidden, prompt_mask).view(-1, group, hidden.shape[-1])[:, 0]
            per_layer.append(infonce(query, answers[:, 0], answers[:, 1:], self.tau))
        return nll[:, 0].mean(), torch.stack(per_layer).mean()


@torch.no_grad()
def pair_accuracy(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Share of questions whose truthful answer has a higher per-token log-likelihood than every hallucinated
    one: a validation criterion that does not depend on which layers are trained."""
    device = next(model.parameters()).device
    wins, total = 0, 0
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
        nll = answer_nll(logits, input_ids, batch["answer_mask"].to(device)).view(
            -1, int(batch["group_size"])
        )
        wins += int((nll[:, :1] < nll[:, 1:]).all(dim=1).sum())
        total += nll.shape[0]
    return wins / max(total, 1)


# --- the recipe ---------------------------------------------------------------------------------------------


@dataclass
class MitigationOptions:
    """Everything that shapes one mitigation run besides the layers; ``logprob_reduction`` is
    :class:`ContrastiveObjective`'s ``reduction``."""

    contrast: str = "infonce"
    logprob_reduction: str = "sum"
    tau: float = 0.1
    lam: float = 0.5
    lora: bool = False
    lora_rank: int = 8
    negatives: int = 2
    max_length: int = 128
    questions_per_batch: int = 4
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """Reject an unknown contrast or reduction before the model loads (the CLI builds these first)."""
        check_contrast(self.contrast, self.logprob_reduction)


@dataclass
class MitigationResult:
    layers: list[int]
    training: TrainResult
    val_pair_accuracy_before: float | None
    val_pair_accuracy_after: float | None
    record: dict[str, Any] = field(default_factory=dict)


def lora_wrap(model: nn.Module, layers: Sequence[int], rank: int) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on every linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) inside
    the chosen blocks only."""
    from peft import LoraConfig, get_peft_model

    targets = lora_module_names(model, list(layers), None)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, config)


def mitigate(
    model: nn.Module,
    tokenizer: Any,
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    layers: Sequence[int],
    options: MitigationOptions | None = None,
    splitter: Splitter = split_of,
) -> tuple[nn.Module, MitigationResult]:
    """Train ``layers`` of ``model`` against hallucinated answers; returns the trained (LoRA-merged) model.

    Full-weight training changes ``model`` in place; with ``options.lora`` the adapters are merged into the
    weights before returning, so the result saves and reloads as a plain model. ``splitter`` only names the
    pairs' splits in the record (a fold run's, rather than the fixed split's).
    """
    options = options or MitigationOptions()
    layers = sorted(layers)
    if not train_pairs:
        raise MitigationConfigError("no training pairs: check --pairs and the data directory")
    started = time.perf_counter()
    make = lambda pairs: contrastive_batches(  # noqa: E731
        tokenizer,
        pairs,
        negatives=options.negatives,
        max_length=options.max_length,
        questions_per_batch=options.questions_per_batch,
    )
    train_batches, val_batches = make(train_pairs), make(val_pairs) if val_pairs else []
    before = pair_accuracy(model, val_batches) if val_batches else None
    prefixes = [get_adapter(model).layer_name(layer) for layer in layers]
    objective = ContrastiveObjective(
        layers, options.contrast, options.tau, options.lam, reduction=options.logprob_reduction
    )
    if options.lora:
        trained = lora_wrap(model, layers, options.lora_rank)
        selector = substring_selector("lora_")
    else:
        trained, selector = model, prefix_selector(prefixes)
    result = train(
        trained, objective, train_batches, trainable=selector, val_batches=val_batches, config=options.train
    )
    if options.lora:
        trained = trained.merge_and_unload()
    for param in trained.parameters():
        param.requires_grad_(False)
    after = pair_accuracy(trained, val_batches) if val_batches else None
    record = {
        "layers": layers,
        "options": asdict(options),
        "train_pairs": describe_pairs(train_pairs, splitter),
        "val_pairs": describe_pairs(val_pairs, splitter),
        "training": result.to_dict(),
        "val_pair_accuracy": {"before": before, "after": after},
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return trained, MitigationResult(layers, result, before, after, record)


def save_mitigated(
    model: nn.Module, tokenizer: Any, out: str | Path, record: dict[str, Any], overwrite: bool = False
) -> Path:
    """``save_pretrained`` the model and tokenizer plus ``avss_mitigation.json``, atomically."""
    from avss.io import to_json

    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(to_json(record), encoding="utf-8")
    return Path(out)
