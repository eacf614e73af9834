"""The scorer interface and its registry.

A scorer turns calibration data bound to a model (:class:`~avss.scorers.context.ScoringContext`) into one
number per layer, higher meaning more important, and chooses which layers to remove for a budget. Scorers are
small dataclasses whose fields are their options, so ``avss[site=delta,threshold=abs:1e-5]`` on the command
line is ``AvssScorer(site="delta", threshold="abs:1e-5")`` in Python, and adding a method is adding a class
with ``@register_scorer("name")``, as tasks are registered in lm-evaluation-harness.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from avss.errors import PruneConfigError
from avss.pruning.rules import select_count
from avss.registry import class_registrar

if TYPE_CHECKING:
    from avss.scorers.context import ScoringContext

SCORERS: dict[str, type[Scorer]] = {}


@dataclass
class LayerImportance:
    """One score per layer (higher = more important) and the options that produced them.

    ``details`` holds method-specific extras a selection rule may need (e.g. the angular distance matrix).
    """

    method: str
    scores: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return int(self.scores.numel())

    def ranking(self) -> list[int]:
        """Layer indices from least to most important."""
        return torch.argsort(self.scores, stable=True).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": self.options,
            "scores": self.scores.tolist(),
            "ranking": self.ranking(),
            "warnings": self.warnings,
        }


@dataclass
class Scorer(ABC):
    """A layer-importance method. Subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str]
    # Whether the scores depend on the model's activations (position baselines do not).
    uses_activations: ClassVar[bool] = True
    # Whether scoring re-runs the model with single blocks skipped (leave-one-out): a CachedContext then runs
    # only the blocks after the skipped one, which pays for its memory even in a one-shot selection.
    skips_blocks: ClassVar[bool] = False
    # Whether the scores read each block's attention and MLP similarities (SublayerStats), which the shared
    # pass measures only when some scorer asks for them.
    needs_sublayers: ClassVar[bool] = False
    # Whether ``select`` needs only ``importance.scores`` (not ``details``), so that scores read back from a
    # result file, where details are not stored, can select for a new budget.
    selects_from_scores: ClassVar[bool] = True

    @abstractmethod
    def score(self, context: ScoringContext) -> LayerImportance:
        """Per-layer importance of ``context.model`` on ``context``'s calibration data."""

    def select(self, importance: LayerImportance, n_remove: int, protect: set[int]) -> list[int]:
        """The ``n_remove`` layers to remove, ascending; by default the lowest-scoring unprotected ones."""
        return select_count(importance.scores, n_remove, protect)

    def sites(self) -> tuple[str, ...]:
        """Activation sites the shared statistics pass must measure for this scorer."""
        return ()

    def thresholds(self) -> tuple[str, ...]:
        """Near-zero thresholds the shared statistics pass must count for this scorer."""
        return ()

    def batches_read(self) -> int | None:
        """How many leading calibration batches the scores read (None: all of them)."""
        return None

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def spec(self) -> str:
        """The canonical name: ``name`` alone for default options, else ``name[key=value,...]``."""
        changed = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        }
        if not changed:
            return self.name
        return f"{self.name}[{','.join(f'{key}={value}' for key, value in changed.items())}]"

    def importance(self, scores: torch.Tensor, **kwargs: Any) -> LayerImportance:
        return LayerImportance(self.spec, scores.to(torch.float64), self.options(), **kwargs)


register_scorer = class_registrar(SCORERS, "scorer")


def available_scorers() -> list[str]:
    return sorted(SCORERS)


def split_methods(text: str) -> list[str]:
    """Split a comma-separated method list, keeping commas inside ``[...]`` option brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def optional_of(kind: Any) -> Any:
    """``int`` for an option typed ``int | None`` (None is its default, never written in a spec)."""
    members = [member for member in typing.get_args(kind) if member is not type(None)]
    return members[0] if len(members) == 1 and type(None) in typing.get_args(kind) else kind


def get_scorer(spec: str) -> Scorer:
    """Build a scorer from ``name`` or ``name[key=value,...]`` (e.g. ``avss[site=delta,variance=pooled]``)."""
    spec = spec.strip()
    name, _, rest = spec.partition("[")
    if name not in SCORERS:
        raise PruneConfigError(f"unknown method {name!r}; available: {', '.join(available_scorers())}")
    cls = SCORERS[name]
    if rest and not rest.endswith("]"):
        raise PruneConfigError(f"method {spec!r}: options go in brackets, e.g. {name}[key=value]")
    types = typing.get_type_hints(cls)
    accepted = {f.name for f in dataclasses.fields(cls)}
    options: dict[str, Any] = {}
    for item in split_methods(rest[:-1]) if rest else []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise PruneConfigError(f"method {name}: unknown option {item!r} (options: {known})")
        kind = optional_of(types[key])
        try:
            options[key] = kind(value.strip()) if kind in (int, float) else value.strip()
        except ValueError:
            raise PruneConfigError(f"method {name}: option {key} needs a number, got {value!r}") from None
    try:
        return cls(**options)
    except ValueError as exc:
        raise PruneConfigError(f"method {spec}: {exc}") from exc
