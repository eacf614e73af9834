"""HSAV, HSS and EAVSS as pure functions of per-layer variance and sparsity (method.md section 4).

With ``V_l(X)`` and ``S_l(X)`` the answer-token variance and sparsity of layer ``l`` on truthful (T) or
hallucinated (H) answers:

- ``ratio`` (default): ``HSAV_l = V_l(H) / V_l(T)``, ``HSS_l = S_l(H) / S_l(T)``;
- ``diff``: ``HSAV_l = |V_l(H) - V_l(T)|``, ``HSS_l = |S_l(H) - S_l(T)|``.

Each is normalized over layers (``HSAV~``, ``HSS~``) and ``EAVSS_l = HSAV~_l / HSS~_l``; high EAVSS marks a
hallucination-prone layer. A zero ``HSS`` (identical sparsity under ``diff``) would divide by zero; it gets
the smallest positive ``HSS`` of the other layers, or 1 when all are zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from avss.scorers.avss import normalize

Combiner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

COMBINERS: dict[str, Combiner] = {
    "ratio": lambda hallucinated, truthful: hallucinated / truthful,
    "diff": lambda hallucinated, truthful: (hallucinated - truthful).abs(),
}


def combine(hallucinated: torch.Tensor, truthful: torch.Tensor, how: str) -> torch.Tensor:
    if how not in COMBINERS:
        raise ValueError(f"unknown combine rule {how!r}; choose from {', '.join(COMBINERS)}")
    return COMBINERS[how](hallucinated.to(torch.float64), truthful.to(torch.float64))


def floor_zeros(values: torch.Tensor) -> torch.Tensor:
    """Replace zeros by the smallest positive value (or 1 if none), so a ratio by ``values`` stays finite."""
    positive = values[values > 0]
    floor = positive.min() if positive.numel() else torch.ones((), dtype=values.dtype)
    return torch.where(values > 0, values, floor)


@dataclass
class EavssScores:
    """Per-layer HSAV, HSS, EAVSS (raw and normalized) and the T/H ingredients they came from."""

    variance_truthful: torch.Tensor
    variance_hallucinated: torch.Tensor
    sparsity_truthful: torch.Tensor
    sparsity_hallucinated: torch.Tensor
    hsav: torch.Tensor
    hss: torch.Tensor
    hsav_normalized: torch.Tensor
    hss_normalized: torch.Tensor
    eavss: torch.Tensor
    eavss_normalized: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.eavss.numel())

    def ranking(self) -> list[int]:
        """Layers from most to least hallucination-prone (ties keep layer order)."""
        return torch.argsort(-self.eavss, stable=True).tolist()

    def top(self, k: int) -> list[int]:
        return sorted(self.ranking()[:k])

    def bottom(self, k: int) -> list[int]:
        return sorted(self.ranking()[::-1][:k])

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> EavssScores:
        """Rebuild the scores from :meth:`to_dict` output (e.g. a saved ``eavss.json``)."""
        names = [f.name for f in fields(cls) if f.name != "options"]
        rows = saved["layers"]
        columns = {name: torch.tensor([row[name] for row in rows], dtype=torch.float64) for name in names}
        return cls(**columns, options=dict(saved.get("options", {})))

    def to_dict(self) -> dict[str, Any]:
        columns = {
            "variance_truthful": self.variance_truthful,
            "variance_hallucinated": self.variance_hallucinated,
            "sparsity_truthful": self.sparsity_truthful,
            "sparsity_hallucinated": self.sparsity_hallucinated,
            "hsav": self.hsav,
            "hss": self.hss,
            "hsav_normalized": self.hsav_normalized,
            "hss_normalized": self.hss_normalized,
            "eavss": self.eavss,
            "eavss_normalized": self.eavss_normalized,
        }
        ranks = {layer: rank for rank, layer in enumerate(self.ranking())}
        return {
            "options": self.options,
            "ranking": self.ranking(),
            "layers": [
                {"layer": layer, "rank": ranks[layer], **{k: float(v[layer]) for k, v in columns.items()}}
                for layer in range(self.num_layers)
            ],
        }


def eavss_scores(
    variance_truthful: torch.Tensor,
    variance_hallucinated: torch.Tensor,
    sparsity_truthful: torch.Tensor,
    sparsity_hallucinated: torch.Tensor,
    how: str = "ratio",
    options: dict[str, Any] | None = None,
) -> EavssScores:
    """HSAV, HSS and EAVSS from per-layer variance and sparsity of truthful and hallucinated answers."""
    hsav = combine(variance_hallucinated, variance_truthful, how)
    hss = floor_zeros(combine(sparsity_hallucinated, sparsity_truthful, how))
    hsav_n, hss_n = normalize(hsav), normalize(hss)
    eavss = hsav_n / hss_n
    return EavssScores(
        variance_truthful=variance_truthful.to(torch.float64),
        variance_hallucinated=variance_hallucinated.to(torch.float64),
        sparsity_truthful=sparsity_truthful.to(torch.float64),
        sparsity_hallucinated=sparsity_hallucinated.to(torch.float64),
        hsav=hsav,
        hss=hss,
        hsav_normalized=hsav_n,
        hss_normalized=hss_n,
        eavss=eavss,
        eavss_normalized=normalize(eavss),
        options={"combine": how, **(options or {})},
    )
