"""AVSS and its parts as pure functions of per-layer statistics.

Conventions (see the method specification, section 2): variance and sparsity are each normalized to sum to
one over layers, ``AVSS_l = V~_l / S~_l``, and ``AVSS~_l = AVSS_l / sum_k AVSS_k``. Low AVSS means low
importance. A layer with no near-zero values would divide by zero; it gets the add-one floor
``S = 1 / (N + 1)`` and is listed in :attr:`LayerScores.floored` so outputs can warn about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from avss.stats.accumulators import ActivationStats, Threshold


def normalize(values: torch.Tensor) -> torch.Tensor:
    """Scale non-negative per-layer values to sum to one."""
    total = values.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("cannot normalize: values must be finite, non-negative and not all zero")
    return values / total


def sparsity(near_zero: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of near-zero values per layer, with the add-one floor for layers that have none.

    Returns the sparsity and a boolean mask of floored layers.
    """
    count = count.to(torch.float64)
    raw = near_zero.to(torch.float64) / count.clamp_min(1)
    floored = near_zero == 0
    return torch.where(floored, 1.0 / (count + 1.0), raw), floored


def avss(variance: torch.Tensor, sparsity_: torch.Tensor) -> torch.Tensor:
    """Unnormalized AVSS: normalized variance over normalized sparsity."""
    return normalize(variance) / normalize(sparsity_)


@dataclass
class LayerScores:
    """Per-layer AVSS and its ingredients, with the options that produced them."""

    variance: torch.Tensor
    sparsity: torch.Tensor
    variance_normalized: torch.Tensor
    sparsity_normalized: torch.Tensor
    avss: torch.Tensor
    avss_normalized: torch.Tensor
    floored: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.avss.numel())

    def ranking(self) -> list[int]:
        """Layer indices from least to most important."""
        return torch.argsort(self.avss, stable=True).tolist()

    def warnings(self) -> list[str]:
        if not self.floored:
            return []
        return [
            f"{len(self.floored)} layer(s) {self.floored} have no values under the sparsity threshold "
            f"{self.options.get('threshold')}; their sparsity was floored at 1/(N+1), which dominates AVSS. "
            "Consider a relative threshold such as rel:0.01."
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "floored_layers": self.floored,
            "warnings": self.warnings(),
            "layers": [
                {
                    "layer": layer,
                    "variance": float(self.variance[layer]),
                    "sparsity": float(self.sparsity[layer]),
                    "variance_normalized": float(self.variance_normalized[layer]),
                    "sparsity_normalized": float(self.sparsity_normalized[layer]),
                    "avss": float(self.avss[layer]),
                    "avss_normalized": float(self.avss_normalized[layer]),
                }
                for layer in range(self.num_layers)
            ],
        }


def score_layers(
    stats: ActivationStats, site: str = "block", variance: str = "elements", threshold: str = "rel:0.01"
) -> LayerScores:
    """AVSS for every layer from streamed statistics."""
    if site not in stats.sites:
        raise ValueError(f"site {site!r} was not measured (measured: {', '.join(stats.sites)})")
    site_stats = stats.sites[site]
    parsed = Threshold.parse(threshold)
    var = site_stats.variance(variance)
    spars, floored = sparsity(site_stats.sparsity_counts(parsed), site_stats.count)
    scores = avss(var, spars)
    return LayerScores(
        variance=var,
        sparsity=spars,
        variance_normalized=normalize(var),
        sparsity_normalized=normalize(spars),
        avss=scores,
        avss_normalized=normalize(scores),
        floored=floored.nonzero().flatten().tolist(),
        options={"site": site, "variance": variance, "threshold": str(parsed)},
    )
