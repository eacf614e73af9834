"""Stream answer-token statistics through a model for truthful and hallucinated answers and score EAVSS.

The statistics are the same streamed, mergeable ones AVSS uses (:mod:`avss.stats.collect`); only the batches
differ: their ``stat_mask`` selects answer tokens. AVSS on the union of both passes is reported beside EAVSS.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avss.errors import OptionError
from avss.hallucination.batches import answer_batches
from avss.hallucination.eavss import COMBINERS, EavssScores, eavss_scores
from avss.hallucination.pairs import Pair, Splitter, describe_pairs, split_of
from avss.io import atomic_write, atomic_write_json
from avss.provenance import Provenance
from avss.scorers.avss import LayerScores, score_layers, sparsity
from avss.scorers.run import ScoreOptions
from avss.stats.accumulators import ActivationStats, Threshold
from avss.stats.collect import collect_statistics

EAVSS_FORMAT = "avss-eavss/1"  # untagged files: the same keys without format, created, avss_version, command


@dataclass
class EavssOptions:
    """What to measure and how to combine it; ``site``, ``variance`` and ``threshold`` are AVSS's options."""

    site: str = "block"
    variance: str = "elements"
    threshold: str = "rel:0.01"
    combine: str = "ratio"
    max_length: int = 128
    batch_size: int = 8
    max_hallucinated: int | None = 3

    def __post_init__(self) -> None:
        """Reject bad options before the model loads and both statistics passes run (was a traceback)."""
        ScoreOptions(site=self.site, variance=self.variance, threshold=self.threshold)
        if self.combine not in COMBINERS:
            raise OptionError(f"invalid --combine {self.combine!r}; choose one of {', '.join(COMBINERS)}")
        if self.max_length < 2 or self.batch_size < 1:
            raise OptionError("--max-length must be >= 2 and --batch-size >= 1")


@dataclass
class EavssRun:
    """Statistics of both answer kinds, their EAVSS and AVSS scores, and provenance: ``provenance`` leads the
    saved ``eavss.json`` (:class:`~avss.provenance.Provenance` keys, then the pairs and run details)."""

    truthful: ActivationStats
    hallucinated: ActivationStats
    scores: EavssScores
    avss: LayerScores
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        result = {**self.provenance, **self.scores.to_dict()}
        for row, avss_value in zip(result["layers"], self.avss.avss_normalized.tolist(), strict=True):
            row["avss_normalized"] = avss_value
        return result

    def save(self, out: str | Path) -> Path:
        """Write ``eavss.json`` and ``eavss.png`` into ``out``."""
        out = Path(out)
        atomic_write_json(out / "eavss.json", self.to_dict())
        atomic_write(out / "eavss.png", lambda tmp: plot_scores(self.scores, self.avss, tmp))
        return out


def site_measures(stats: ActivationStats, options: EavssOptions) -> tuple[Any, Any]:
    site = stats.sites[options.site]
    spars, _ = sparsity(site.sparsity_counts(Threshold.parse(options.threshold)), site.count)
    return site.variance(options.variance), spars


def score_eavss(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    options: EavssOptions | None = None,
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
    splitter: Splitter = split_of,
) -> EavssRun:
    """Collect answer-token statistics separately for T and H answers and compute EAVSS per layer
    (``splitter`` only names the pairs' splits in the provenance)."""
    options = options or EavssOptions()
    started = time.perf_counter()
    measure = ScoreOptions(site=options.site, variance=options.variance, threshold=options.threshold)
    collected = {}
    for kind in ("truthful", "hallucinated"):
        batches = answer_batches(
            tokenizer,
            pairs,
            kind,
            max_length=options.max_length,
            batch_size=options.batch_size,
            max_hallucinated=options.max_hallucinated,
        )
        collected[kind] = collect_statistics(
            model,
            batches,
            sites=measure.sites(),
            thresholds=measure.all_thresholds(),
            relations=False,
            progress=progress,
        )
    var_t, spars_t = site_measures(collected["truthful"], options)
    var_h, spars_h = site_measures(collected["hallucinated"], options)
    scores = eavss_scores(var_t, var_h, spars_t, spars_h, options.combine, options=asdict(options))
    union = collected["truthful"].merge(collected["hallucinated"])
    avss = score_layers(union, options.site, options.variance, options.threshold)
    provenance = {
        **Provenance.now(EAVSS_FORMAT, model=model_info or {}).to_dict(),
        "pairs": describe_pairs(pairs, splitter),
        "num_values": {kind: int(stats.sites[options.site].count[0]) for kind, stats in collected.items()},
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return EavssRun(collected["truthful"], collected["hallucinated"], scores, avss, provenance)


def plot_scores(scores: EavssScores, avss: LayerScores, path: Path) -> None:
    """HSAV~, HSS~ and EAVSS~ per layer relative to the layer mean (1 = average layer, so small differences
    stay visible), with AVSS~ beside them; the top EAVSS layers are marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = scores.num_layers
    layers = list(range(num_layers))
    relative = {
        "HSAV~ x L (variance H/T)": scores.hsav_normalized,
        "HSS~ x L (sparsity H/T)": scores.hss_normalized,
        "EAVSS~ x L (high = hallucination-prone)": scores.eavss_normalized,
    }
    top = scores.ranking()[: max(1, num_layers // 8)]
    figure, axes = plt.subplots(len(relative) + 1, 1, figsize=(9, 9), sharex=True)
    for axis, (title, values) in zip(axes, relative.items(), strict=False):
        scaled = (values * num_layers).tolist()
        axis.plot(layers, scaled, marker="o", color="tab:blue")
        axis.scatter(top, [scaled[layer] for layer in top], color="tab:red", zorder=3)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=10)
    axes[-1].bar(layers, avss.avss_normalized.tolist(), color="tab:green")
    axes[-1].set_title("AVSS~ (importance)", fontsize=10)
    axes[-1].set_xlabel("layer (red: top EAVSS layers)")
    figure.suptitle(f"EAVSS per layer ({scores.options.get('combine')}, site {scores.options.get('site')})")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)
