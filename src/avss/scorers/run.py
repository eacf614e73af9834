"""The scoring workflow of ``avss score``: calibration text to batches, streamed statistics (resumable,
sharded under torchrun), AVSS scores and their provenance. Pruning has one path for every method,
:func:`avss.pruning.prune.prune`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avss.adapters import SITES
from avss.data import CalibrationOptions, TextSource
from avss.errors import OptionError
from avss.io import atomic_write_json
from avss.launch import context
from avss.models import LoadedModel
from avss.provenance import Provenance
from avss.scorers.avss import LayerScores, score_layers
from avss.stats.accumulators import VARIANCE_KINDS, ActivationStats, Threshold
from avss.stats.checkpoint import Progress, StatisticsCheckpoint
from avss.stats.collect import DEFAULT_THRESHOLDS
from avss.stats.distributed import collect_distributed

SCORES_FORMAT = "avss-scores/1"  # untagged scores files are the same layout without format and created


@dataclass
class ScoreOptions:
    """Which AVSS variant to compute; ``measure_sites`` may include more sites to keep in the statistics."""

    site: str = "block"
    variance: str = "elements"
    threshold: str = "rel:0.01"
    measure_sites: tuple[str, ...] = ()
    thresholds: tuple[str, ...] = DEFAULT_THRESHOLDS

    def __post_init__(self) -> None:
        """Reject bad options before minutes are spent loading a model and streaming data."""
        unknown = [site for site in self.sites() if site not in SITES]
        if unknown:
            raise OptionError(f"invalid --site {unknown[0]!r}; choose one of {', '.join(SITES)}")
        if self.variance not in VARIANCE_KINDS:
            choices = ", ".join(VARIANCE_KINDS)
            raise OptionError(f"invalid --variance {self.variance!r}; choose one of {choices}")
        for text in self.all_thresholds():
            try:
                Threshold.parse(text)
            except ValueError as exc:
                raise OptionError(f"--threshold: {exc}") from None

    def sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.site, *self.measure_sites)))

    def all_thresholds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.thresholds, self.threshold)))

    def scorer_spec(self) -> str:
        """The ``avss[...]`` method name that scores with these options (``avss prune --method avss``)."""
        return f"avss[site={self.site},variance={self.variance},threshold={self.threshold}]"


@dataclass
class ScoreRun:
    """The statistics and AVSS scores of one model, with everything needed to reproduce them: ``provenance``
    leads the saved file (:class:`~avss.provenance.Provenance` keys, then calibration and run details)."""

    stats: ActivationStats
    scores: LayerScores
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.provenance, **self.scores.to_dict()}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())


def score(
    loaded: LoadedModel,
    source: TextSource | None = None,
    calibration: CalibrationOptions | None = None,
    options: ScoreOptions | None = None,
    progress: bool = True,
    checkpoint: StatisticsCheckpoint | None = None,
) -> ScoreRun:
    """Stream calibration text through the model and compute AVSS for every layer.

    With ``checkpoint`` the merged statistics are saved as the pass goes and a resumed run starts after the
    last saved batch; the caller removes the checkpoint (``checkpoint.finish()``) once its output is written.
    """
    source = source or TextSource()
    calibration = calibration or CalibrationOptions()
    options = options or ScoreOptions()
    started = time.perf_counter()
    batches = calibration.batches(loaded.tokenizer, source)
    run_id = {
        "model": loaded.source,
        "data": source.describe(),
        "calibration": asdict(calibration),
        "score_options": asdict(options),
        "num_batches": len(batches),
    }
    resumed = checkpoint.restore(run_id) if checkpoint is not None else Progress()
    stats = collect_distributed(  # plain collect_statistics unless launched by torchrun / accelerate
        loaded.model,
        batches.batches[resumed.batches_done :],
        sites=options.sites(),
        thresholds=options.all_thresholds(),
        stats=resumed.stats,
        progress=progress,
        on_batch=checkpoint.on_batch(run_id, resumed.batches_done) if checkpoint is not None else None,
    )
    scores = score_layers(stats, options.site, options.variance, options.threshold)
    provenance = {
        **Provenance.now(SCORES_FORMAT, model=run_id["model"], data=run_id["data"]).to_dict(),
        **{key: run_id[key] for key in ("calibration", "score_options")},
        "num_tokens": batches.num_tokens,
        "num_sequences": batches.num_sequences,
        "resumed_at_batch": resumed.batches_done,
        "world_size": context().world_size,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return ScoreRun(stats, scores, provenance)
