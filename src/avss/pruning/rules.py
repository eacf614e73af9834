"""Which layers to remove: the selection rules (pure functions of a score vector, low score = remove
first) and :class:`PruneSpec`, the validated options of one pruning.

``count`` removes ``round(f x M)`` (or ``n``) layers; ``mass`` sorts ascending and removes layers while the
cumulative normalized score stays within ``tau``. Protected layers are never removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avss.errors import PruneConfigError
from avss.stats.accumulators import SUBLAYER_KINDS

RULES = ("count", "mass")
PATCHES = ("linear",)
SUBLAYERS = SUBLAYER_KINDS  # what --sublayer removes: a block's attention or its MLP


def check_sublayer(kind: str) -> None:
    if kind not in SUBLAYERS:
        raise PruneConfigError(f"unknown --sublayer {kind!r}; choose one of {', '.join(SUBLAYERS)}")


def protected_layers(num_layers: int, protect: tuple[str, ...] | list[str] = ()) -> set[int]:
    """Layer indices named by ``protect`` (``first``, ``last`` or explicit integers)."""
    named = {"first": 0, "last": num_layers - 1}
    result = set()
    for item in protect:
        item = str(item).strip()
        if item in named:
            result.add(named[item])
        elif item.lstrip("-").isdigit() and -num_layers <= int(item) < num_layers:
            result.add(int(item) % num_layers)
        elif item:
            raise PruneConfigError(
                f"cannot protect {item!r}: use first, last or a layer index < {num_layers}"
            )
    return result


def check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise PruneConfigError(f"--fraction must be strictly between 0 and 1, got {fraction}")


def check_tau(tau: float) -> None:
    if not 0 < tau <= 1:
        raise PruneConfigError(f"--tau must be in (0, 1], got {tau}")


def layers_for_fraction(fraction: float, num_layers: int) -> int:
    check_fraction(fraction)
    count = round(fraction * num_layers)
    if count == 0:
        raise PruneConfigError(
            f"--fraction {fraction} of {num_layers} layers rounds to 0 layers; use a larger fraction"
        )
    return count


def check_budget(n_remove: int, num_layers: int, protect: set[int]) -> None:
    """Refuse a budget that removes nothing, every layer, or a protected one (before any scoring is spent)."""
    if n_remove < 1:
        raise PruneConfigError(f"number of layers to remove must be at least 1, got {n_remove}")
    if n_remove >= num_layers or n_remove > num_layers - len(protect):
        raise PruneConfigError(
            f"cannot remove {n_remove} of {num_layers} layers ({len(protect)} protected): "
            "at least one layer must remain"
        )


def select_count(scores: torch.Tensor, n_remove: int, protect: set[int] | None = None) -> list[int]:
    """The ``n_remove`` lowest-scoring unprotected layers, in ascending layer order."""
    protect = protect or set()
    check_budget(n_remove, scores.numel(), protect)
    order = [layer for layer in torch.argsort(scores, stable=True).tolist() if layer not in protect]
    return sorted(order[:n_remove])


def select_mass(scores: torch.Tensor, tau: float, protect: set[int] | None = None) -> list[int]:
    """Remove layers in ascending score order while the cumulative normalized score is <= ``tau``.

    Sorting happens *before* the cumulative sum; summing in layer order (as the published AVSS.py does)
    would select the shallowest layers instead of the lowest-scoring ones.
    """
    check_tau(tau)
    protect = protect or set()
    normalized = scores.to(torch.float64) / scores.sum()
    order = [layer for layer in torch.argsort(normalized, stable=True).tolist() if layer not in protect]
    cumulative = torch.cumsum(normalized[order], dim=0)
    chosen = [layer for layer, total in zip(order, cumulative.tolist(), strict=True) if total <= tau + 1e-12]
    if not chosen:
        raise PruneConfigError(
            f"--tau {tau} is below the lowest layer's share ({float(normalized[order[0]]):.4f}); "
            "nothing to remove"
        )
    if len(chosen) >= scores.numel():
        raise PruneConfigError(f"--tau {tau} would remove every layer; use a smaller tau")
    return sorted(chosen)


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


def parse_layers(text: str) -> tuple[int, ...]:
    """``--layers 3,5,21``: the block indices to remove, as given (checked by :meth:`PruneSpec.check`)."""
    items = [item.strip() for item in text.split(",")]
    bad = next((item for item in items if not item.lstrip("+-").isdigit()), None)
    if bad is not None:
        raise PruneConfigError(
            f"--layers takes comma-separated block indices such as 3,5,21; got {bad!r} in {text!r}"
        )
    return tuple(int(item) for item in items)


@dataclass
class PruneSpec:
    """How many layers to remove and how to choose them, and how to repair what they did.

    ``patch="linear"`` folds a least-squares linear map for each removed run into the preceding kept block's
    MLP down projection (:mod:`avss.healing.patch`; ``patch_ridge`` is relative to the mean eigenvalue of the
    fit's Gram matrix). Block 0 then counts as protected: a run starting there has no preceding MLP.

    ``sublayer`` (``attn`` or ``mlp``) removes that sublayer of the chosen blocks instead of whole blocks
    (:mod:`avss.pruning.sublayers`); the budget (``fraction``, ``n_layers``, ``layers``) then counts
    sublayers.
    """

    rule: str = "count"
    fraction: float | None = 0.25
    n_layers: int | None = None
    tau: float | None = None
    protect: tuple[str, ...] = ()
    patch: str | None = None
    patch_ridge: float = 0.0
    layers: tuple[int, ...] | None = None
    sublayer: str | None = None

    def __post_init__(self) -> None:
        self.check()  # what one spec alone can get wrong; ``check(iterative)`` adds the combination

    def check(self, iterative: bool = False) -> PruneSpec:
        """Check what does not depend on the model, so a bad option fails before minutes of scoring."""
        if self.sublayer is not None:
            self.check_sublayer(iterative)
        if self.layers is not None:
            self.check_given_layers(iterative)
        if self.patch is not None and self.patch not in PATCHES:
            raise PruneConfigError(f"unknown --patch {self.patch!r}; choose one of {', '.join(PATCHES)}")
        if not (0 <= self.patch_ridge < float("inf")):
            raise PruneConfigError(f"--patch-ridge must be a finite number >= 0, got {self.patch_ridge}")
        if self.patch is not None and iterative:
            raise PruneConfigError(
                "--patch linear cannot be combined with --iterative (the fit needs the unpruned model's "
                "activations, and iterative selection prunes the model while it selects); drop one of them"
            )
        if self.rule not in RULES:
            raise PruneConfigError(f"unknown --rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.rule == "count" and self.n_layers is None and self.fraction is not None:
            check_fraction(self.fraction)
        if self.rule == "count" and self.n_layers is not None and self.n_layers < 1:
            raise PruneConfigError(f"--n-layers must be at least 1, got {self.n_layers}")
        if self.rule == "mass" and self.tau is not None:
            check_tau(self.tau)
        return self

    def check_sublayer(self, iterative: bool) -> None:
        """Sublayer removal keeps every block, so neither the patch (which stands in for removed blocks) nor
        iterative selection (which re-scores a model with fewer blocks) applies."""
        check_sublayer(self.sublayer or "")
        if self.patch is not None:
            raise PruneConfigError(
                "--sublayer cannot be combined with --patch (the patch stands in for removed blocks, and "
                "--sublayer keeps every block); drop one of them"
            )
        if iterative:
            raise PruneConfigError(
                "--sublayer cannot be combined with --iterative (iterative selection re-scores after "
                "removing whole blocks); drop one of them"
            )

    def check_given_layers(self, iterative: bool = False, num_layers: int | None = None) -> None:
        """``layers``, the blocks to remove as given: no duplicates, no negative index, no budget or rule
        beside them; with ``num_layers``, also in range, not protected and not every block."""
        layers = list(self.layers or ())
        if not layers:
            raise PruneConfigError("--layers needs at least one block index, e.g. --layers 3,5,21")
        if iterative or self.n_layers is not None or self.rule != "count" or self.protect:
            raise PruneConfigError(
                "--layers gives the blocks to remove; it cannot be combined with --n-layers, --rule, "
                "--protect or --iterative"
            )
        twice = next((layer for layer in layers if layers.count(layer) > 1), None)
        if twice is not None:
            raise PruneConfigError(f"--layers lists block {twice} twice")
        if min(layers) < 0:
            raise PruneConfigError(f"--layers block {min(layers)} is negative; blocks are numbered from 0")
        if num_layers is None:
            return
        if max(layers) >= num_layers:
            raise PruneConfigError(
                f"--layers block {max(layers)} out of range for a {num_layers}-block model "
                f"(blocks 0-{num_layers - 1})"
            )
        if len(layers) >= num_layers:
            raise PruneConfigError(
                f"--layers lists all {num_layers} blocks of the model; at least one must remain"
            )
        protected = sorted(set(layers) & self.protected(num_layers))
        if protected:
            raise PruneConfigError(
                f"--layers block {protected[0]} cannot be removed with --patch (a patched run needs a kept "
                "block before it)"
            )

    def layers_to_remove(self, num_layers: int) -> int:
        """The ``count`` rule's budget for a ``num_layers``-layer model: ``n_layers``, else ``fraction``."""
        if self.n_layers is None:
            return layers_for_fraction(self.fraction if self.fraction is not None else 0.25, num_layers)
        if not 0 < self.n_layers < num_layers:
            raise PruneConfigError(
                f"--n-layers must be between 1 and {num_layers - 1} for a {num_layers}-layer model, "
                f"got {self.n_layers}"
            )
        return self.n_layers

    def protected(self, num_layers: int) -> set[int]:
        """The layers never removed: ``protect``, plus block 0 when a patch needs a block before every run."""
        return protected_layers(num_layers, self.protect) | ({0} if self.patch is not None else set())

    def select(self, scores: torch.Tensor) -> list[int]:
        num_layers = scores.numel()
        protect = self.protected(num_layers)
        if self.rule == "count":
            return select_count(scores, self.layers_to_remove(num_layers), protect)
        if self.rule == "mass":
            return select_mass(scores, self.tau if self.tau is not None else 0.25, protect)
        raise PruneConfigError(f"unknown --rule {self.rule!r}; choose one of {', '.join(RULES)}")
