"""Scorers reading the shared statistics pass: AVSS, its two halves, block influence, angular distance, and
the influence of each block's attention and MLP sublayers (LLM-Drop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from avss.adapters import SITES
from avss.errors import PruneConfigError
from avss.scorers.avss import normalize, score_layers, sparsity
from avss.scorers.base import LayerImportance, Scorer, register_scorer
from avss.scorers.context import ScoringContext
from avss.stats.accumulators import Threshold

VARIANCES = ("elements", "pooled")


@dataclass
class SiteScorer(Scorer):
    """Options shared by the scorers built from one site's variance and sparsity."""

    site: str = "block"
    variance: str = "elements"
    threshold: str = "rel:0.01"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site must be one of {', '.join(SITES)}, not {self.site!r}")
        if self.variance not in VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, not {self.variance!r}")
        self.threshold = str(Threshold.parse(self.threshold))

    def sites(self) -> tuple[str, ...]:
        return (self.site,)

    def thresholds(self) -> tuple[str, ...]:
        return (self.threshold,)


@register_scorer("avss")
@dataclass
class AvssScorer(SiteScorer):
    """AVSS (method spec section 2): normalized variance over normalized sparsity."""

    def score(self, context: ScoringContext) -> LayerImportance:
        scores = score_layers(context.statistics(), self.site, self.variance, self.threshold)
        return self.importance(scores.avss, warnings=scores.warnings())


@register_scorer("variance")
@dataclass
class VarianceScorer(SiteScorer):
    """Ablation: the variance half of AVSS alone (high variance = important)."""

    def score(self, context: ScoringContext) -> LayerImportance:
        site = context.statistics().sites[self.site]
        return self.importance(normalize(site.variance(self.variance)))

    def thresholds(self) -> tuple[str, ...]:
        return ()


@register_scorer("sparsity")
@dataclass
class SparsityScorer(SiteScorer):
    """Ablation: the sparsity half of AVSS alone, as ``1 / S~`` (low sparsity = important)."""

    def score(self, context: ScoringContext) -> LayerImportance:
        site = context.statistics().sites[self.site]
        values, _ = sparsity(site.sparsity_counts(self.threshold), site.count)
        return self.importance(1.0 / normalize(values))


@register_scorer("block_influence")
@dataclass
class BlockInfluenceScorer(Scorer):
    """ShortGPT: ``BI_l = 1 - mean token cos(h_l, h_{l+1})``; a block that barely turns the stream is
    redundant."""

    def score(self, context: ScoringContext) -> LayerImportance:
        return self.importance(context.statistics().relations.block_influence)


@register_scorer("angular")
@dataclass
class AngularScorer(Scorer):
    """Gromov et al.: angular distance between the last real token's states before and after blocks.

    The per-layer score is ``d(h_l, h_{l+1})``; the selection for ``n`` layers is the contiguous span
    ``l..l+n-1`` with the smallest ``d(h_l, h_{l+n})``, as in the paper.
    """

    selects_from_scores: ClassVar[bool] = False

    def score(self, context: ScoringContext) -> LayerImportance:
        distance = context.statistics().relations.angular_distance
        return self.importance(distance.diagonal(offset=1).clone(), details={"angular_distance": distance})

    def select(self, importance: LayerImportance, n_remove: int, protect: set[int]) -> list[int]:
        distance = importance.details["angular_distance"]
        num_layers = importance.num_layers
        spans = [
            (float(distance[start, start + n_remove]), start)
            for start in range(num_layers - n_remove + 1)
            if not protect & set(range(start, start + n_remove))
        ]
        if not spans or n_remove >= num_layers:
            raise PruneConfigError(
                f"no contiguous span of {n_remove} of {num_layers} layers avoids the protected layers "
                f"{sorted(protect)}"
            )
        _, best = min(spans)
        return list(range(best, best + n_remove))


@dataclass
class SublayerInfluenceScorer(Scorer):
    """LLM-Drop (He et al., arXiv 2406.15786): a sublayer's importance is
    ``1 - mean token cos(x, x + F(LN x))``, ``x`` the residual stream entering it and ``F(LN x)`` what it
    adds, over real tokens.

    The scores rank one kind of sublayer per block, so they are what ``avss prune --sublayer`` removes by;
    read as block scores they say only how much that half of each block turns the stream.
    """

    kind: ClassVar[str]
    needs_sublayers = True

    def score(self, context: ScoringContext) -> LayerImportance:
        sublayers = context.statistics().sublayers
        if sublayers is None:
            raise PruneConfigError(
                f"method {self.name} needs the sublayer similarities; build the context with "
                "context_for(...) or ScoringContext(..., sublayers=True)"
            )
        return self.importance(sublayers.influence(self.kind))


@register_scorer("attn_influence")
@dataclass
class AttentionInfluenceScorer(SublayerInfluenceScorer):
    """LLM-Drop's attention similarity: ``1 - mean cos(x, x + attention output)``; low = removable."""

    kind = "attn"


@register_scorer("mlp_influence")
@dataclass
class MlpInfluenceScorer(SublayerInfluenceScorer):
    """LLM-Drop's MLP similarity: ``1 - mean cos(x, x + MLP output)``, ``x`` the stream after attention."""

    kind = "mlp"
