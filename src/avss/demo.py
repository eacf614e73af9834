"""The end-to-end demo behind ``make demo``: score, prune 25%, save, reload, and compare perplexity.

Runs offline on the embedded default model and the bundled corpus; when a data directory with WikiText-2 is
present, perplexity is also measured on (the start of) its test split.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from avss.data import bundled_text, resolve_data_dir, split_paragraphs, wikitext2_texts
from avss.errors import DataError
from avss.evaluation import perplexity
from avss.io import atomic_directory, atomic_write_json, atomic_write_text
from avss.models import DEFAULT_MODEL, load_model
from avss.pipeline import CalibrationOptions, ScoreOptions, ScoreRun, package_versions, prune, save, score
from avss.plots import plot_layer_scores
from avss.prune import PruneSpec


@dataclass
class DemoOptions:
    model: str = DEFAULT_MODEL
    fraction: float = 0.25
    samples: int = 64
    max_length: int = 256
    batch_size: int = 8
    ppl_max_length: int = 512
    wikitext_paragraphs: int = 200
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str | None = None


@dataclass
class DemoResult:
    removed_layers: list[int]
    num_layers_before: int
    num_layers_after: int
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    max_logit_difference_after_reload: float = 0.0
    wall_time_s: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def summary_line(self) -> str:
        parts = [
            f"{name}: {values['before']:.2f} -> {values['after']:.2f} ({values['retained']:.1%} retained)"
            for name, values in self.perplexity.items()
        ]
        return (
            f"removed {len(self.removed_layers)}/{self.num_layers_before} layers {self.removed_layers}; "
            f"perplexity {'; '.join(parts)}"
        )


def _perplexity_sets(data_dir: str | None, paragraphs: int) -> dict[str, list[str]]:
    sets = {"bundled_evaluation": split_paragraphs(bundled_text("evaluation"))}
    directory = resolve_data_dir(data_dir)
    if directory is not None:
        with contextlib.suppress(DataError):  # a data directory without WikiText-2 is fine here
            sets["wikitext2_test"] = wikitext2_texts(directory, "test")[:paragraphs]
    return sets


def run_demo(
    out: str | Path, options: DemoOptions | None = None, overwrite: bool = False
) -> tuple[DemoResult, ScoreRun]:
    """Score all layers, prune ``fraction`` of them, save + reload, and measure perplexity before/after."""
    from transformers import AutoModelForCausalLM

    options = options or DemoOptions()
    started = time.perf_counter()
    eval_sets = _perplexity_sets(options.data_dir, options.wikitext_paragraphs)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        loaded = load_model(options.model, device=options.device, dtype=options.dtype)
        calibration = CalibrationOptions(options.samples, options.max_length, options.batch_size)
        run = score(loaded, calibration=calibration, options=ScoreOptions())
        before = {
            name: perplexity(loaded.model, loaded.tokenizer, texts, max_length=options.ppl_max_length)
            for name, texts in eval_sets.items()
        }
        num_layers = run.scores.num_layers
        result = prune(loaded, run, PruneSpec(fraction=options.fraction))
        save(loaded, result, tmp / "model")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=loaded.model.dtype)
        reloaded.to(loaded.model.device).eval()
        probe = loaded.tokenizer(["The tide comes in twice a day."], return_tensors="pt").to(reloaded.device)
        with torch.no_grad():
            difference = (reloaded(**probe).logits - loaded.model(**probe).logits).abs().max().item()
        after = {
            name: perplexity(reloaded, loaded.tokenizer, texts, max_length=options.ppl_max_length)
            for name, texts in eval_sets.items()
        }
        demo = DemoResult(
            removed_layers=result.removed,
            num_layers_before=num_layers,
            num_layers_after=len(result.kept),
            perplexity={
                name: {"before": before[name], "after": after[name], "retained": before[name] / after[name]}
                for name in eval_sets
            },
            max_logit_difference_after_reload=difference,
            wall_time_s=round(time.perf_counter() - started, 1),
            options=asdict(options),
        )
        run.save(tmp / "scores.json")
        plot_layer_scores(
            run.scores, tmp / "scores.png", result.removed, title=f"AVSS per layer: {options.model}"
        )
        atomic_write_json(
            tmp / "summary.json",
            {
                **asdict(demo),
                "model": loaded.source,
                "versions": package_versions(),
                "summary": demo.summary_line(),
            },
        )
        atomic_write_text(tmp / "summary.txt", demo.summary_line() + "\n")
    return demo, run
