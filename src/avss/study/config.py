"""What defines a study: its options (:class:`StudyConfig`), the modes of its cells and their names."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from avss.data import CalibrationOptions, TextSource
from avss.errors import PruneConfigError
from avss.evaluation import get_task
from avss.evaluation.uncertainty import RESAMPLES
from avss.healing.methods import get_heal_method
from avss.io import to_json
from avss.models import DTYPES
from avss.pruning.rules import protected_layers
from avss.scorers import Scorer, get_scorer

DEFAULT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5)
DEFAULT_TASKS = ("wikitext2", "truthfulqa_mc", "sst2")
ONESHOT, ITERATIVE = "oneshot", "iterative"
PROTECTED = "oneshot+protect"  # a one-shot selection that keeps the blocks named by ``StudyConfig.protect``
ATTENTION = "attn"  # attention sublayers removed (every block kept), at the parameters of a block budget
HEALED = "+healed"  # mode suffix of a cell whose pruned model was healed before evaluation
PATCHED = "+patch"  # mode suffix of a cell whose removed runs were replaced by a fitted linear map
REPAIRS = (HEALED, PATCHED)
RANDOM = "random"
# Options that only say which cells exist (or how the tables resample them): a rerun may change them, and
# every finished cell stays valid. Every other option defines what a cell measures and must match.
GROWABLE = frozenset(
    {
        "methods",
        "attention_methods",
        "fractions",
        "random_seeds",
        "protect",
        "iterative",
        "iterative_methods",
        "patch",
        "repair_methods",
        "resamples",
    }
)
# How healed cells are made: a study without them (``heal`` None) may start healing; after that, fixed.
HEALING = frozenset({"heal", "heal_steps"})


@dataclass
class StudyConfig:
    """Everything that defines a study; a rerun into the same folder must use the same config."""

    model: str
    methods: list[str]
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    limits: dict[str, int | None] = field(default_factory=dict)
    iterative: bool = False
    # Methods also selected iteratively when ``iterative`` is off: e.g. the cheap statistics-based ones, where
    # iterative leave-one-out would cost a full pass per remaining block and step.
    iterative_methods: list[str] = field(default_factory=list)
    calibration: CalibrationOptions = field(default_factory=lambda: CalibrationOptions(samples=32))
    calibration_data: TextSource = field(default_factory=TextSource)
    task_options: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 16
    data_dir: str | None = None
    seed: int = 0
    heal: str | None = None
    heal_steps: int = 32
    # Also evaluate every pruned model with its removed runs replaced by a fitted linear map (healing.patch).
    patch: bool = False
    # Methods whose cells get the healed and patched twins; empty: every method (the random draws too).
    repair_methods: list[str] = field(default_factory=list)
    resamples: int = RESAMPLES  # bootstrap resamples of every interval in the tables
    # Draws of the random order (seeds 0..N-1), reported as a null band; 1 keeps a single draw.
    random_seeds: int = 1
    # Blocks every one-shot selection is also evaluated without (e.g. ["first", "last"]); empty: none.
    protect: list[str] = field(default_factory=list)
    # Precision of every cell (load_model's --dtype); "auto" is float32 on CPU, bfloat16 on recent GPUs.
    dtype: str = "auto"
    # Methods that rank attention sublayers (attn_influence, avss[site=attn], random): each block budget is
    # also spent on attention sublayers holding as many parameters (cells of mode "attn"), where it fits.
    attention_methods: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.methods:
            raise PruneConfigError("give at least one method")
        if self.random_seeds < 1:
            raise PruneConfigError(f"random_seeds must be >= 1, got {self.random_seeds}")
        if self.protect:
            protected_layers(2, [item for item in self.protect if item in ("first", "last")])
            bad = [item for item in self.protect if item not in ("first", "last") and not item.isdigit()]
            if bad:
                raise PruneConfigError(f"cannot protect {bad[0]!r}: use first, last or a layer index")
        specs = {scorer.spec for scorer in self.scorers()}  # names and options checked before any model loads
        self.attention_scorers()
        named_options = {"iterative-methods": self.iterative_methods, "repair-methods": self.repair_methods}
        for option, named in named_options.items():
            missing = [spec for spec in map(canonical, named) if spec not in specs and spec != RANDOM]
            if missing:
                raise PruneConfigError(f"--{option} {missing[0]!r} is not one of the study's methods")
        if self.heal is not None:
            get_heal_method(self.heal)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise PruneConfigError(f"invalid dtype {self.dtype!r}; use auto, {', '.join(DTYPES)}")
        for task in self.tasks:
            get_task(task)
        bad = [f for f in self.fractions if not 0 <= f < 1]
        if bad:
            raise PruneConfigError(f"fractions must be in [0, 1), got {bad}")
        self.fractions = sorted(set(self.fractions))

    def scorers(self) -> list[Scorer]:
        """The methods' scorers; a plain ``random`` stands for ``random_seeds`` seeded draws."""
        scorers = []
        for method in self.methods:
            scorer = get_scorer(method)
            if scorer.spec == RANDOM and self.random_seeds > 1:
                scorers += [get_scorer(f"{RANDOM}[seed={seed}]") for seed in range(self.random_seeds)]
            else:
                scorers.append(scorer)
        return scorers

    def attention_scorers(self) -> list[Scorer]:
        return [get_scorer(method) for method in self.attention_methods]

    def modes(self) -> list[str]:
        """Pruning modes of the selections: one-shot, iterative, one-shot with protected blocks."""
        modes = [ONESHOT, ITERATIVE] if self.iterative or self.iterative_methods else [ONESHOT]
        return [*modes, PROTECTED] if self.protect else modes

    def modes_of(self, scorer: Scorer) -> list[str]:
        """The modes a method runs in. Iterating only means something for a method that re-scores the
        pruned model (position rules and random draws give the same order again), and the random null
        band is drawn once, unprotected: protecting its draws would double the study for a control."""
        iterated = self.iterative or names(scorer) & {canonical(m) for m in self.iterative_methods}
        return [
            mode
            for mode in self.modes()
            if not (mode == ITERATIVE and not (scorer.uses_activations and iterated))
            and not (mode == PROTECTED and scorer.spec.startswith(RANDOM))
        ]

    def repairs(self) -> list[str]:
        """Mode suffixes of the repaired twins of every pruned cell ("" is the unrepaired cell itself)."""
        return ["", *([HEALED] if self.heal else []), *([PATCHED] if self.patch else [])]

    def repairs_of(self, scorer: Scorer) -> list[str]:
        """The repair suffixes of a method's cells: every repair, unless ``repair_methods`` leaves it out."""
        if self.repair_methods and not names(scorer) & {canonical(m) for m in self.repair_methods}:
            return [""]
        return self.repairs()

    def cell_modes(self) -> list[str]:
        """Modes of evaluated cells: every pruning mode and its repaired twins."""
        return [mode + repair for repair in self.repairs() for mode in self.modes()]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(to_json(asdict(self)))

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The JSON form of every option that has a default."""
        values = {}
        for item in fields(cls):
            if item.default is not MISSING:
                values[item.name] = item.default
            elif item.default_factory is not MISSING:
                values[item.name] = item.default_factory()
        return json.loads(to_json(values))


def with_defaults(stored: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with every key it lacks taken from ``defaults``, nested option groups included."""
    merged = dict(defaults)
    for key, value in stored.items():
        default = defaults.get(key)
        both_groups = isinstance(value, dict) and isinstance(default, dict)
        merged[key] = with_defaults(value, default) if both_groups else value
    return merged


def parse_limits(text: str | None, tasks: Sequence[str]) -> dict[str, int | None]:
    """``"100"`` (every task) or ``"wikitext2=40,sst2=200"`` (per task; unnamed tasks are not limited)."""
    if not text:
        return {task: None for task in tasks}
    if "=" not in text:
        return {task: int(text) for task in tasks}
    limits: dict[str, int | None] = {task: None for task in tasks}
    for item in text.split(","):
        task, _, value = item.partition("=")
        if task.strip() not in limits:
            raise PruneConfigError(
                f"--limit names {task.strip()!r}, which is not among the tasks {list(tasks)}"
            )
        limits[task.strip()] = int(value)
    return limits


def slug(text: str) -> str:
    """A file-name-safe form of a method spec (``avss[site=delta]`` -> ``avss-site-delta``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def selection_name(scorer: Scorer, mode: str) -> str:
    """The key of a method's selection in one mode: its file name in ``selections/``, less ``.json``."""
    return f"{slug(scorer.spec)}__{mode}"


def budget(fraction: float, num_layers: int) -> int:
    return round(fraction * num_layers)


def canonical(method: str) -> str:
    """A method's canonical spec (``block_influence`` as typed, ``avss[site=block]`` as ``avss``)."""
    return get_scorer(method).spec


def names(scorer: Scorer) -> set[str]:
    """The names a method option may give a scorer by: its spec, and ``random`` for every seeded draw."""
    return {scorer.spec, RANDOM} if scorer.spec.startswith(RANDOM) else {scorer.spec}


def repair_of(mode: str) -> str:
    """The repair suffix of a cell's mode (``oneshot+patch`` -> ``+patch``; "" when unrepaired)."""
    return next((repair for repair in REPAIRS if mode.endswith(repair)), "")
