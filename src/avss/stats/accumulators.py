"""Streaming, mergeable per-layer activation statistics.

Nothing here keeps activations: each batch is reduced on its own device to a handful of float64 numbers
per layer (count, mean, M2, near-zero counts, ...) which are folded into running totals with Chan et al.'s
parallel update. The same merge combines shards from many GPUs or machines, so memory stays flat as data
grows and a sharded run gives exactly the single-process answer.

Everything in this module is a pure function of tensors, testable without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

ACCUMULATOR_DTYPE = torch.float64
VARIANCE_KINDS = ("elements", "pooled")


@dataclass(frozen=True)
class Threshold:
    """A near-zero rule: ``abs:EPS`` (|a| < EPS) or ``rel:RHO`` (|a| < RHO x RMS of the token's vector)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        kind, sep, value = text.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or kind not in ("abs", "rel") or not number > 0 or not math.isfinite(number):
            raise ValueError(f"invalid threshold {text!r}; use abs:EPS or rel:RHO with a positive number")
        return cls(kind, number)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def chan_merge(
    count_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan, Golub & LeVeque's pairwise merge of (count, mean, M2); exact for any split of the data.

    Empty sides (count 0) are handled without division by zero, elementwise, so the function vectorizes over
    layers.
    """
    count = count_a + count_b
    safe = torch.where(count > 0, count, torch.ones_like(count))
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta.square() * (count_a * count_b / safe)
    return count, mean, m2


def batch_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) of all elements of ``values``, computed in float64 with a two-pass formula."""
    x = values.to(ACCUMULATOR_DTYPE)
    count = torch.tensor(float(x.numel()), dtype=ACCUMULATOR_DTYPE, device=x.device)
    if x.numel() == 0:
        zero = torch.zeros((), dtype=ACCUMULATOR_DTYPE, device=x.device)
        return count, zero, zero.clone()
    mean = x.mean()
    m2 = (x - mean).square().sum()
    return count, mean, m2


def near_zero_counts(
    tokens: torch.Tensor,
    thresholds: tuple[Threshold, ...],
    mask: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """How many elements of the selected tokens fall under each threshold; float64 tensor of shape (K,).

    ``tokens`` is (..., D); ``mask`` (...) selects tokens (all when None) and ``norms`` (...) may pass their
    precomputed L2 norms. Unselected tokens get a limit of -1, which no magnitude is below, so padding is
    excluded without gathering the real tokens (a boolean gather would force a host sync on GPU).

    Each threshold is one broadcast comparison of the magnitudes against a per-token limit, counted with
    ``count_nonzero``: comparing against all K limits at once would materialize a (..., D, K) boolean
    tensor, which on CPU costs several times the whole reduction.
    """
    if not thresholds:
        return torch.zeros(0, dtype=ACCUMULATOR_DTYPE, device=tokens.device)
    magnitude = tokens.abs()
    if norms is None and any(threshold.kind == "rel" for threshold in thresholds):
        norms = torch.linalg.vector_norm(tokens.float(), dim=-1)
    rms_scale = 1.0 / math.sqrt(tokens.shape[-1])
    limit_dtype = torch.promote_types(magnitude.dtype, torch.float32)  # bf16 would round the thresholds
    counts = []
    for threshold in thresholds:
        if threshold.kind == "abs":
            limit = torch.full_like(magnitude[..., 0], threshold.value, dtype=limit_dtype)
        else:
            assert norms is not None
            limit = (norms * (threshold.value * rms_scale)).to(limit_dtype)
        if mask is not None:
            limit = torch.where(mask, limit, -1.0)
        counts.append(torch.count_nonzero(magnitude < limit.unsqueeze(-1)))
    return torch.stack(counts).to(ACCUMULATOR_DTYPE)


def pooled_variance_sum(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published AVSS code's variance: mean-pool each sequence over its real tokens, take the variance
    across channels (population variance), and return the sum over sequences with the number of sequences.

    The pooling is one batched matrix product in the activations' precision (at least float32); only the
    (B, D) pooled vectors are reduced in float64.
    """
    compute = torch.promote_types(hidden.dtype, torch.float32)
    weights = mask.to(compute).unsqueeze(1)
    lengths = weights.sum(dim=-1)
    pooled = torch.bmm(weights, hidden.to(compute)).squeeze(1) / lengths.clamp_min(1)
    per_sequence = pooled.to(ACCUMULATOR_DTYPE).var(dim=-1, unbiased=False)
    keep = lengths.squeeze(-1) > 0
    return torch.where(keep, per_sequence, 0.0).sum(), keep.sum().to(ACCUMULATOR_DTYPE)


def token_moments(
    hidden: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused (count, mean, M2) of the elements of the selected tokens, plus every token's L2 norm.

    Each token's own moments come from the textbook two-pass formula over its D channels (sum, then the norm
    of the deviations from the token's mean) in at least float32: two row reductions and one subtraction in
    the activations' cache-friendly precision, with no cancellation however large the token's mean is.
    Everything after works on (B, T) per-token values in float64: tokens are combined with Chan's formula
    (within-token M2 plus the spread of token means), and each token's L2 norm follows exactly from its
    moments (|x|^2 = M2 + D mean^2, a sum of non-negative terms) instead of another pass. Reducing every
    element in float64 cost about twice as much on CPU (2.1 vs 1.0 ms per SmolLM2 layer and batch), for
    accuracy float32 already gives over D values. Returns float64 scalars and (B, T) float64 norms.
    """
    width = hidden.shape[-1]
    values = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    row_means = values.mean(dim=-1, keepdim=True)
    row_m2 = torch.linalg.vector_norm(values - row_means, dim=-1).to(ACCUMULATOR_DTYPE).square()
    token_means = torch.where(mask, row_means.squeeze(-1).to(ACCUMULATOR_DTYPE), 0.0)
    within = torch.where(mask, row_m2, 0.0)
    count = mask.sum(dtype=ACCUMULATOR_DTYPE) * width
    mean = token_means.sum() * width / count.clamp_min(1)
    between = torch.where(mask, (token_means - mean).square(), 0.0) * width
    norms = (within + width * token_means.square()).sqrt()
    return count, mean, (within + between).sum(), norms


@dataclass
class SiteBatch:
    """What one batch contributes to a :class:`SiteStats`; fields may carry a leading layer axis.

    Hooks produce one per layer; :meth:`stack` joins them so a whole batch is folded in with a handful of
    vectorized operations instead of Python work per layer.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    near_zero: torch.Tensor
    pooled_sum: torch.Tensor
    pooled_count: torch.Tensor

    @classmethod
    def stack(cls, batches: list[SiteBatch], device: torch.device | str) -> SiteBatch:
        names = [f.name for f in fields(cls)]
        return cls(**{name: torch.stack([getattr(b, name).to(device) for b in batches]) for name in names})


def reduce_site(
    hidden: torch.Tensor, mask: torch.Tensor, thresholds: tuple[Threshold, ...]
) -> tuple[SiteBatch, torch.Tensor]:
    """Reduce one activation (B, T, D) with token mask (B, T) to its :class:`SiteBatch` and the token norms.

    Runs on the activation's device without host synchronization; the norms are returned so the caller can
    reuse them (relative thresholds and block-influence cosines need them too).
    """
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    count, mean, m2, norms = token_moments(hidden, mask)
    near_zero = near_zero_counts(hidden, thresholds, mask, norms)
    pooled_sum, pooled_count = pooled_variance_sum(hidden, mask)
    return SiteBatch(count, mean, m2, near_zero, pooled_sum, pooled_count), norms


def masked_cosine_sum(
    before: torch.Tensor,
    after: torch.Tensor,
    mask: torch.Tensor,
    before_norms: torch.Tensor | None = None,
    after_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over selected tokens of cos(before, after) and the number of tokens, as float64 scalars.

    Matches ``torch.nn.functional.cosine_similarity`` (norms clamped at 1e-8); precomputed norms skip a pass.
    """
    compute = torch.promote_types(after.dtype, torch.float32)
    before, after = before.to(compute), after.to(compute)
    if before_norms is None:
        before_norms = torch.linalg.vector_norm(before, dim=-1)
    if after_norms is None:
        after_norms = torch.linalg.vector_norm(after, dim=-1)
    eps = 1e-8
    denominator = before_norms.to(compute).clamp_min(eps) * after_norms.to(compute).clamp_min(eps)
    cosine = torch.linalg.vecdot(before, after) / denominator
    return torch.where(mask, cosine.to(ACCUMULATOR_DTYPE), 0.0).sum(), mask.sum(dtype=ACCUMULATOR_DTYPE)


@dataclass
class SiteStats:
    """Running statistics of one site (e.g. ``block``) for every layer; tensors have a leading layer axis."""

    num_layers: int
    thresholds: tuple[Threshold, ...]
    count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    mean: torch.Tensor = field(default=None)  # type: ignore[assignment]
    m2: torch.Tensor = field(default=None)  # type: ignore[assignment]
    near_zero: torch.Tensor = field(default=None)  # type: ignore[assignment]
    pooled_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    pooled_count: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        zeros = lambda *shape: torch.zeros(shape, dtype=ACCUMULATOR_DTYPE)  # noqa: E731
        for name, shape in self._shapes().items():
            if getattr(self, name) is None:
                setattr(self, name, zeros(*shape))

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        layers = self.num_layers
        return {
            "count": (layers,),
            "mean": (layers,),
            "m2": (layers,),
            "near_zero": (layers, len(self.thresholds)),
            "pooled_sum": (layers,),
            "pooled_count": (layers,),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._shapes()}

    def to(self, device: torch.device | str) -> SiteStats:
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device))
        return self

    def update(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold one batch of one layer in: ``hidden`` (B, T, D) with token ``mask`` (B, T).

        The reduction reads ``hidden`` and ``mask`` and never gathers the real tokens (a boolean gather
        synchronizes GPU and host).
        """
        batch, _ = reduce_site(hidden, mask, self.thresholds)
        self.fold(SiteBatch.stack([batch], self.count.device), layers=[layer])

    def fold(self, batch: SiteBatch, layers: list[int] | None = None) -> None:
        """Fold a stacked :class:`SiteBatch` in, vectorized over ``layers`` (default: all, in order)."""
        index = slice(None) if layers is None else torch.tensor(layers, device=self.count.device)
        running = (self.count[index], self.mean[index], self.m2[index])
        merged = chan_merge(*running, batch.count, batch.mean, batch.m2)
        self.count[index], self.mean[index], self.m2[index] = merged
        self.near_zero[index] += batch.near_zero
        self.pooled_sum[index] += batch.pooled_sum
        self.pooled_count[index] += batch.pooled_count

    def merge(self, other: SiteStats) -> SiteStats:
        """Statistics of the union of both shards' data (``self`` and ``other`` are left unchanged)."""
        if self.num_layers != other.num_layers or self.thresholds != other.thresholds:
            raise ValueError("cannot merge statistics with different layers or thresholds")
        other = SiteStats(other.num_layers, other.thresholds, **other.tensors()).to(self.count.device)
        count, mean, m2 = chan_merge(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return SiteStats(
            self.num_layers,
            self.thresholds,
            count=count,
            mean=mean,
            m2=m2,
            near_zero=self.near_zero + other.near_zero,
            pooled_sum=self.pooled_sum + other.pooled_sum,
            pooled_count=self.pooled_count + other.pooled_count,
        )

    @property
    def variance_elements(self) -> torch.Tensor:
        """Population variance over all measured values of each layer: M2 / N."""
        return self.m2 / self.count.clamp_min(1)

    @property
    def variance_pooled(self) -> torch.Tensor:
        """Mean over sequences of the across-channel variance of the mean-pooled sequence."""
        return self.pooled_sum / self.pooled_count.clamp_min(1)

    def variance(self, kind: str = "elements") -> torch.Tensor:
        if kind == "elements":
            return self.variance_elements
        if kind == "pooled":
            return self.variance_pooled
        raise ValueError(f"unknown variance kind {kind!r}; choose elements or pooled")

    def sparsity_counts(self, threshold: Threshold | str) -> torch.Tensor:
        if isinstance(threshold, str):
            threshold = Threshold.parse(threshold)
        if threshold not in self.thresholds:
            measured = ", ".join(str(t) for t in self.thresholds)
            raise ValueError(f"threshold {threshold} was not measured (measured: {measured})")
        return self.near_zero[:, self.thresholds.index(threshold)]


@dataclass
class RelationStats:
    """Statistics that relate layers to each other, for the baselines sharing the AVSS pass.

    ``cosine_sum``/``cosine_count``: per block, sum over real tokens of cos(h_l, h_{l+1}) (ShortGPT block
    influence). ``angular_sum``/``angular_count``: over sequences, sum of arccos(cos(h_i, h_j)) / pi between
    the last real token's residual states at every pair of depths 0..L (Gromov et al.).
    """

    num_layers: int
    cosine_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    cosine_count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    angular_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    angular_count: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        layers = self.num_layers
        defaults = {
            "cosine_sum": (layers,),
            "cosine_count": (layers,),
            "angular_sum": (layers + 1, layers + 1),
            "angular_count": (),
        }
        for name, shape in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=ACCUMULATOR_DTYPE))

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("cosine_sum", "cosine_count", "angular_sum", "angular_count")
        return {name: getattr(self, name) for name in names}

    def to(self, device: torch.device | str) -> RelationStats:
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device))
        return self

    def update_cosine(self, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Add the per-token cosines between a block's input and output (both (N, D), real tokens only)."""
        mask = torch.ones(before.shape[:-1], dtype=torch.bool, device=before.device)
        total, count = masked_cosine_sum(before, after, mask)
        self.fold_cosine(total.reshape(1), count.reshape(1), layers=[layer])

    def fold_cosine(self, sums: torch.Tensor, counts: torch.Tensor, layers: list[int] | None = None) -> None:
        """Add per-layer cosine sums and token counts, vectorized over ``layers`` (default: all)."""
        index = slice(None) if layers is None else torch.tensor(layers, device=self.cosine_sum.device)
        self.cosine_sum[index] += sums.to(self.cosine_sum.device)
        self.cosine_count[index] += counts.to(self.cosine_count.device)

    def update_angular(self, last_tokens: torch.Tensor) -> None:
        """Add angular distances between all depths for one batch; ``last_tokens`` is (L+1, B, D)."""
        unit = torch.nn.functional.normalize(last_tokens.to(ACCUMULATOR_DTYPE), dim=-1)
        cosine = torch.einsum("ibd,jbd->bij", unit, unit).clamp(-1.0, 1.0)
        self.angular_sum += (torch.arccos(cosine) / math.pi).sum(dim=0)
        self.angular_count += last_tokens.shape[1]

    def merge(self, other: RelationStats) -> RelationStats:
        device = self.cosine_sum.device
        return RelationStats(
            self.num_layers,
            **{name: mine + other.tensors()[name].to(device) for name, mine in self.tensors().items()},
        )

    @property
    def block_influence(self) -> torch.Tensor:
        """ShortGPT BI_l = 1 - mean token cosine between block input and output; low = redundant."""
        return 1.0 - self.cosine_sum / self.cosine_count.clamp_min(1)

    @property
    def angular_distance(self) -> torch.Tensor:
        """(L+1, L+1) mean angular distance between the last-token states at depths i and j."""
        return self.angular_sum / self.angular_count.clamp_min(1)


SUBLAYER_KINDS = ("attn", "mlp")


@dataclass
class SublayerStats:
    """Per block, the sums behind LLM-Drop's similarity of each sublayer (He et al., arXiv 2406.15786).

    For the attention sublayer, ``x`` is the residual stream entering the block and ``x'`` the stream after
    the attention sublayer has added its output (``x + F(LN x)``); for the MLP sublayer, ``x`` is that stream
    and ``x'`` the block's output. ``{kind}_sum`` adds cos(x, x') over real tokens and ``{kind}_count`` counts
    them, so shards merge by addition and ``1 - sum / count`` is the sublayer's influence (low = the sublayer
    barely turns the stream, so removing it changes little).
    """

    num_layers: int
    attn_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    attn_count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    mlp_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    mlp_count: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in self._names():
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.num_layers, dtype=ACCUMULATOR_DTYPE))

    @staticmethod
    def _names() -> tuple[str, ...]:
        return tuple(f"{kind}_{part}" for kind in SUBLAYER_KINDS for part in ("sum", "count"))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names()}

    def to(self, device: torch.device | str) -> SublayerStats:
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device))
        return self

    def fold(
        self, kind: str, sums: torch.Tensor, counts: torch.Tensor, layers: list[int] | None = None
    ) -> None:
        """Add per-layer cosine sums and token counts of sublayer ``kind``, vectorized over ``layers``."""
        total, count = getattr(self, f"{kind}_sum"), getattr(self, f"{kind}_count")
        index = slice(None) if layers is None else torch.tensor(layers, device=total.device)
        total[index] += sums.to(total.device)
        count[index] += counts.to(count.device)

    def merge(self, other: SublayerStats) -> SublayerStats:
        """Sums over both shards' tokens (``self`` and ``other`` are left unchanged)."""
        if self.num_layers != other.num_layers:
            raise ValueError("cannot merge sublayer statistics of models with different depths")
        device = self.attn_sum.device
        theirs = other.tensors()
        return SublayerStats(
            self.num_layers, **{name: mine + theirs[name].to(device) for name, mine in self.tensors().items()}
        )

    def influence(self, kind: str) -> torch.Tensor:
        """``1 - mean token cos(x, x')`` of sublayer ``kind`` for every block."""
        if kind not in SUBLAYER_KINDS:
            raise ValueError(f"unknown sublayer {kind!r}; choose one of {', '.join(SUBLAYER_KINDS)}")
        return 1.0 - getattr(self, f"{kind}_sum") / getattr(self, f"{kind}_count").clamp_min(1)


@dataclass
class ActivationStats:
    """All statistics of one calibration pass: one :class:`SiteStats` per site plus layer relations, and the
    sublayer similarities where the pass measured them (``sublayers``; None otherwise)."""

    sites: dict[str, SiteStats]
    relations: RelationStats
    num_sequences: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    sublayers: SublayerStats | None = None

    @property
    def num_layers(self) -> int:
        return self.relations.num_layers

    @property
    def thresholds(self) -> tuple[Threshold, ...]:
        return next(iter(self.sites.values())).thresholds

    def merge(self, other: ActivationStats) -> ActivationStats:
        if set(self.sites) != set(other.sites):
            raise ValueError("cannot merge statistics measured at different sites")
        if (self.sublayers is None) != (other.sublayers is None):
            raise ValueError("cannot merge statistics with and without sublayer similarities")
        sublayers = None
        if self.sublayers is not None and other.sublayers is not None:
            sublayers = self.sublayers.merge(other.sublayers)
        return ActivationStats(
            sites={name: site.merge(other.sites[name]) for name, site in self.sites.items()},
            relations=self.relations.merge(other.relations),
            num_sequences=self.num_sequences + other.num_sequences,
            meta=dict(self.meta),
            sublayers=sublayers,
        )

    def to(self, device: torch.device | str) -> ActivationStats:
        for site in self.sites.values():
            site.to(device)
        self.relations.to(device)
        if self.sublayers is not None:
            self.sublayers.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serializable snapshot (float64 values round-trip exactly through Python floats)."""
        as_lists = lambda tensors: {key: value.cpu().tolist() for key, value in tensors.items()}  # noqa: E731
        state = {
            "num_layers": self.num_layers,
            "thresholds": [str(t) for t in self.thresholds],
            "num_sequences": self.num_sequences,
            "meta": self.meta,
            "sites": {name: as_lists(site.tensors()) for name, site in self.sites.items()},
            "relations": as_lists(self.relations.tensors()),
        }
        if self.sublayers is not None:
            state["sublayers"] = as_lists(self.sublayers.tensors())
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ActivationStats:
        thresholds = tuple(Threshold.parse(t) for t in state["thresholds"])
        as_tensor = lambda value: torch.tensor(value, dtype=ACCUMULATOR_DTYPE)  # noqa: E731
        sites = {
            name: SiteStats(state["num_layers"], thresholds, **{k: as_tensor(v) for k, v in values.items()})
            for name, values in state["sites"].items()
        }
        relations = RelationStats(
            state["num_layers"], **{k: as_tensor(v) for k, v in state["relations"].items()}
        )
        sublayers = state.get("sublayers")
        if sublayers is not None:
            sublayers = SublayerStats(state["num_layers"], **{k: as_tensor(v) for k, v in sublayers.items()})
        return cls(sites, relations, state["num_sequences"], dict(state.get("meta", {})), sublayers)

    @classmethod
    def empty(
        cls,
        num_layers: int,
        sites: tuple[str, ...],
        thresholds: tuple[Threshold, ...],
        sublayers: bool = False,
    ) -> ActivationStats:
        return cls(
            sites={name: SiteStats(num_layers, thresholds) for name in sites},
            relations=RelationStats(num_layers),
            sublayers=SublayerStats(num_layers) if sublayers else None,
        )


def masked_cross_products(
    inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's least-squares sums over the selected tokens, in float64.

    ``inputs`` and ``targets`` are (..., D) with token ``mask`` (...). Returns the token count, ``X^T X``,
    ``X^T Y`` (both (D, D)) and ``sum |Y|^2`` for the selected rows X of ``inputs`` and Y of ``targets``.
    Unselected tokens are zeroed rather than gathered (no host sync); the products of float32 values are
    exact in float64, so only the float64 summation rounds.
    """
    keep = mask.to(device=inputs.device, dtype=torch.bool).unsqueeze(-1)
    x = torch.where(keep, inputs.to(ACCUMULATOR_DTYPE), 0.0).reshape(-1, inputs.shape[-1])
    y = torch.where(keep, targets.to(device=inputs.device, dtype=ACCUMULATOR_DTYPE), 0.0)
    y = y.reshape(-1, targets.shape[-1])
    return keep.sum(dtype=ACCUMULATOR_DTYPE), x.T @ x, x.T @ y, y.square().sum()


@dataclass
class LinearFitStats:
    """Streamed sums of a least-squares fit ``X T ~ Y`` for ``num_fits`` independent fits of width ``width``.

    Per fit: the token count, ``xtx = X^T X``, ``xty = X^T Y`` and ``yy = sum |Y|^2``, all float64. They are
    plain sums, so two shards merge by addition (exact up to float64 rounding), and the fit and its residual
    error follow from them without any activation (:mod:`avss.healing.patch`). Memory: ``2 num_fits width^2``
    float64 values (268 MB per fit at width 4096), independent of the number of tokens.
    """

    num_fits: int
    width: int
    count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    xtx: torch.Tensor = field(default=None)  # type: ignore[assignment]
    xty: torch.Tensor = field(default=None)  # type: ignore[assignment]
    yy: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        shapes = {
            "count": (self.num_fits,),
            "xtx": (self.num_fits, self.width, self.width),
            "xty": (self.num_fits, self.width, self.width),
            "yy": (self.num_fits,),
        }
        for name, shape in shapes.items():
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=ACCUMULATOR_DTYPE))

    @staticmethod
    def bytes_needed(num_fits: int, width: int) -> int:
        """Memory of the accumulators: two (width x width) float64 sums per fit."""
        return num_fits * 2 * width * width * torch.finfo(ACCUMULATOR_DTYPE).bits // 8

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in ("count", "xtx", "xty", "yy")}

    def to(self, device: torch.device | str) -> LinearFitStats:
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device))
        return self

    def update(self, fit: int, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold one batch of fit ``fit`` in: ``inputs``/``targets`` (B, T, D) with token ``mask`` (B, T)."""
        sums = masked_cross_products(inputs, targets, mask)
        for name, value in zip(("count", "xtx", "xty", "yy"), sums, strict=True):
            getattr(self, name)[fit] += value.to(self.xtx.device)

    def merge(self, other: LinearFitStats) -> LinearFitStats:
        """Sums over both shards' tokens (``self`` and ``other`` are left unchanged)."""
        if (self.num_fits, self.width) != (other.num_fits, other.width):
            raise ValueError("cannot merge linear-fit sums of different fits or widths")
        device = self.xtx.device
        mine, theirs = self.tensors(), other.tensors()
        return LinearFitStats(
            self.num_fits, self.width, **{name: mine[name] + theirs[name].to(device) for name in mine}
        )
