"""Pruning a model with any scorer, one-shot or iterative, and saving it so that it reloads anywhere: the one
path behind ``avss prune``, the demo, the study and the Python API."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from avss.adapters import get_adapter, remove_layers
from avss.data import CalibrationOptions, TextSource
from avss.errors import PruneConfigError
from avss.healing.patch import check_linear_patch, linear_patch
from avss.io import atomic_directory
from avss.models import LoadedModel
from avss.provenance import Provenance
from avss.pruning.rules import PruneSpec
from avss.pruning.select import Selection, select_layers
from avss.pruning.sublayers import remove_sublayers, restored_sublayers, sublayer_record
from avss.scorers import Scorer, context_for

GIVEN = "layers"  # the method recorded when the blocks to remove are given (avss prune --layers)
PROVENANCE_FILE = "avss_pruning.json"
# Version 2 carries the provenance at the top level; untagged files (version 1) kept ``command`` and
# ``versions`` under ``options``.
PRUNING_FORMAT = "avss-pruning/2"
READABLE_PRUNING_FORMATS = (None, PRUNING_FORMAT)


@dataclass
class PruningRecord:
    """What a pruning removed and how it chose, written beside a pruned model as ``avss_pruning.json``
    (:meth:`to_dict`); ``options`` holds the scorer and calibration behind the choice."""

    source_model: dict[str, Any]
    removed_layers: list[int]
    kept_layers: list[int]
    original_num_layers: int
    method: str
    selection: dict[str, Any]
    scores: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    patch: dict[str, Any] | None = None
    # Removed attention/MLP sublayers (avss.pruning.sublayers.sublayer_record): the blocks stay, so
    # removed_layers is empty; the entry says that the saved files keep those sublayers as zeros and save no
    # compute.
    sublayers: dict[str, Any] | None = None
    provenance: Provenance = field(default_factory=lambda: Provenance.now(PRUNING_FORMAT))

    def to_dict(self) -> dict[str, Any]:
        """The ``avss_pruning.json`` content: the provenance keys first, then the record."""
        record = asdict(self)
        del record["provenance"]
        return {**self.provenance.to_dict(), **record}


@dataclass
class PruneResult:
    """What one pruning removed and kept (original indices), and its provenance record."""

    removed: list[int]
    kept: list[int]
    record: PruningRecord


def save_pruned(
    model: nn.Module, tokenizer: Any, out: str | Path, record: PruningRecord, overwrite: bool = False
) -> Path:
    """Save model, tokenizer and provenance atomically; the folder reloads with ``from_pretrained``.

    Removed sublayers are written as zeros (:func:`avss.pruning.sublayers.restored_sublayers`)."""
    with atomic_directory(out, overwrite=overwrite) as tmp, restored_sublayers(model):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")
    return Path(out)


def prune(
    loaded: LoadedModel,
    scorer: Scorer | None,
    source: TextSource,
    calibration: CalibrationOptions,
    spec: PruneSpec,
    iterative: bool = False,
    progress: bool = True,
) -> tuple[PruneResult, Selection]:
    """Select layers of ``loaded.model`` with ``scorer`` and remove them in place: all of ``avss prune``
    before saving, whatever the method.

    The budget comes from ``spec`` (``count`` rule; ``mass`` only applies to one-shot normalized scores).
    One-shot activation scorers stream their statistics (memory flat in the calibration tokens); the residual
    cache of :class:`~avss.scorers.CachedContext` is kept only where it saves passes: iterative re-scoring and
    scorers that skip blocks. ``spec.patch`` fits and folds the linear patch (:mod:`avss.healing.patch`) on
    the same calibration batches before the blocks are removed; the architecture and memory are checked first.
    ``spec.layers`` gives the blocks to remove: they are checked against the model and removed without any
    scoring pass (``scorer`` may be ``None``; the record's method is ``layers``). ``spec.sublayer`` removes
    that sublayer of the selected blocks instead (:mod:`avss.pruning.sublayers`): the scores rank sublayers,
    every block is kept (``removed_layers`` is empty) and the record's ``sublayers`` entry lists what went.
    """
    started = time.perf_counter()
    spec.check(iterative)
    adapter = get_adapter(loaded.model)
    num_layers = adapter.num_layers
    if spec.sublayer is not None:
        adapter.sublayer_path(spec.sublayer)  # no separable sublayers: refused before scoring
    scoring = spec.layers is None
    if not scoring:  # the blocks are given: checked right after loading, and no scoring pass
        spec.check_given_layers(iterative, num_layers)
    elif scorer is None:
        raise PruneConfigError("a scorer is needed unless the blocks to remove are given (PruneSpec.layers)")
    batches = calibration.batches(loaded.tokenizer, source) if scoring or spec.patch else None
    if spec.patch is not None:
        check_linear_patch(loaded.model, batches.batches)
    protect = spec.protected(num_layers)
    if not scoring:
        selection = Selection(GIVEN, False, sorted(spec.layers or ()))
    else:
        cached = iterative or scorer.skips_blocks
        context = context_for(loaded.model, batches, [scorer], cached=cached, progress=progress)
        if spec.rule == "mass":
            if iterative:
                raise PruneConfigError(
                    "--rule mass cannot be combined with --iterative; use --fraction or --n-layers"
                )
            importance = scorer.score(context)
            selection = Selection(scorer.spec, False, spec.select(importance.scores), [importance])
        else:
            selection = select_layers(
                scorer, context, spec.layers_to_remove(num_layers), protect, iterative=iterative
            )
    patch = None
    if spec.patch is not None:
        patch = linear_patch(loaded.model, batches.batches, selection.removed, spec.patch_ridge, progress)
    sublayers = None
    if spec.sublayer is not None:
        parameters = remove_sublayers(loaded.model, spec.sublayer, selection.removed)
        sublayers = sublayer_record(loaded.model, spec.sublayer, selection.removed, parameters)
    elif not iterative:
        remove_layers(loaded.model, selection.removed)
    removed_blocks = [] if spec.sublayer is not None else selection.removed
    kept = [layer for layer in range(num_layers) if layer not in set(removed_blocks)]
    record = PruningRecord(
        source_model=loaded.source,
        removed_layers=removed_blocks,
        kept_layers=kept,
        original_num_layers=num_layers,
        method=selection.method,
        selection={**asdict(spec), "iterative": iterative, "order": selection.order},
        scores=selection.steps[0].scores.tolist() if selection.steps else [],
        options={
            "scorer": scorer.options() if scoring else None,
            "data": source.describe() if batches is not None else None,
            "calibration": asdict(calibration) if batches is not None else None,
            "num_tokens": batches.num_tokens if batches is not None else 0,
            "wall_time_s": round(time.perf_counter() - started, 3),
        },
        patch=patch,
        sublayers=sublayers,
    )
    return PruneResult(removed_blocks, kept, record), selection
