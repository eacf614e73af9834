"""The end-to-end demo behind ``make demo``: three ways to remove 25% of the blocks, measured side by side.

On the embedded default model it removes the same number of blocks with AVSS as the paper specifies, with
block influence (ShortGPT), and with block influence followed by the linear patch (ReplaceMe-style repair,
:mod:`avss.healing.patch`), through the same :func:`~avss.pruning.prune.prune` as ``avss prune``. Each pruned
model is evaluated on the bundled evaluation text (perplexity) and, when a data directory is present, on the
start of WikiText-2 and a sample of ARC-Easy (a task the model does above chance), and compared with the
unpruned model on the same examples: 95% intervals, the paired NLL change and chance-normalized retention. The
patched model is saved, reloaded with plain ``from_pretrained`` and checked against the in-memory one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from avss.adapters import get_adapter
from avss.data import CalibrationOptions, TextSource, resolve_data_dir
from avss.errors import DeviceError, PruneConfigError
from avss.evaluation import evaluate
from avss.evaluation.runner import EvalResult
from avss.io import atomic_directory, atomic_write_json, atomic_write_text
from avss.models import DEFAULT_MODEL, DTYPES, LoadedModel, load_model
from avss.provenance import Provenance
from avss.pruning.prune import prune, save_pruned
from avss.pruning.rules import PruneSpec, check_fraction
from avss.scorers import get_scorer
from avss.threads import parse_threads


@dataclass(frozen=True)
class Variant:
    """One way of pruning: a layer-importance method, optionally repaired by the linear patch."""

    name: str
    method: str
    patch: bool = False


VARIANTS = (
    Variant("avss", "avss"),
    Variant("block_influence", "block_influence"),
    Variant("block_influence+patch", "block_influence", patch=True),
)
SAVED = "block_influence+patch"  # the variant whose model is saved and reloaded
# summary.json; untagged summaries had the same keys without format, created, avss_version and command
DEMO_FORMAT = "avss-demo/1"
PERPLEXITY_TASKS = ("perplexity", "wikitext2")


@dataclass
class DemoOptions:
    model: str = DEFAULT_MODEL
    fraction: float = 0.25
    samples: int = 64
    max_length: int = 256
    batch_size: int = 8
    ppl_max_length: int = 512
    wikitext_paragraphs: int = 200
    arc_examples: int = 200
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str | None = None
    threads: str = "auto"

    def __post_init__(self) -> None:
        """Bad options fail here, before minutes of loading and scoring."""
        check_fraction(self.fraction)
        parse_threads(self.threads)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise DeviceError(f"invalid --dtype {self.dtype!r}; use auto, {', '.join(DTYPES)}")
        for name in ("samples", "max_length", "batch_size", "ppl_max_length"):
            if getattr(self, name) < 1:
                raise PruneConfigError(f"{name} must be at least 1, got {getattr(self, name)}")

    def tasks(self) -> tuple[list[str], dict[str, int | None]]:
        """Tasks and per-task limits: the bundled text always, WikiText-2 and ARC-Easy with a data dir."""
        tasks: dict[str, int | None] = {"perplexity": None}
        if resolve_data_dir(self.data_dir) is not None:
            tasks.update(wikitext2=self.wikitext_paragraphs, arc_easy=self.arc_examples)
        return list(tasks), tasks


@dataclass
class DemoResult:
    num_layers_before: int
    removed: dict[str, list[int]] = field(default_factory=dict)
    comparisons: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    base: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_logit_difference_after_reload: float = 0.0
    wall_time_s: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per variant: removed blocks, then every task metric against the base."""
        return [
            f"{name}: removed {self.removed[name]}; " + "; ".join(describe(row) for row in rows)
            for name, rows in self.comparisons.items()
        ]


def describe(row: dict[str, Any]) -> str:
    """A saved comparison row (``ComparisonRow.to_dict``) as ``task metric base -> pruned [95% CI]`` and its
    paired NLL change (perplexity) or chance-normalized retention (accuracy)."""

    def interval(key: str, sign: str = "") -> str:
        value = row[key]
        return f"{value['estimate']:{sign}.3g} [{value['low']:{sign}.3g}, {value['high']:{sign}.3g}]"

    name = row["task"] if row["task"] == row["metric"] else f"{row['task']} {row['metric']}"
    text = f"{name} {row['base']['estimate']:.3g} -> {interval('new')}"
    if row["kind"] == "perplexity":
        return text + f" (NLL {interval('difference', '+')} nats/token)"
    if row.get("retention"):
        return text + f" (retention {interval('retention')})"
    return text


def pruned_copy(loaded: LoadedModel, variant: Variant, options: DemoOptions) -> tuple[LoadedModel, Any]:
    """A copy of ``loaded`` pruned by ``variant`` through the one pruning path of ``avss prune``."""
    copied = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.source)
    spec = PruneSpec(fraction=options.fraction, patch="linear" if variant.patch else None)
    calibration = CalibrationOptions(options.samples, options.max_length, options.batch_size)
    result, _ = prune(copied, get_scorer(variant.method), TextSource(), calibration, spec)
    return copied, result


def run_demo(out: str | Path, options: DemoOptions | None = None, overwrite: bool = False) -> DemoResult:
    """Prune ``fraction`` of the blocks three ways, evaluate each against the base, save the patched one."""
    from transformers import AutoModelForCausalLM

    options = options or DemoOptions()
    started = time.perf_counter()
    tasks, limits = options.tasks()

    def measure(model: Any, tokenizer: Any) -> EvalResult:
        results = [
            evaluate(
                model,
                tokenizer,
                [task],
                limit=limits[task],
                data_dir=options.data_dir,
                **({"max_length": options.ppl_max_length} if task in PERPLEXITY_TASKS else {}),
            )
            for task in tasks
        ]
        merged = results[0]
        for result in results[1:]:
            merged.tasks.update(result.tasks)
        return merged

    with atomic_directory(out, overwrite=overwrite) as tmp:
        loaded = load_model(
            options.model, device=options.device, dtype=options.dtype, threads=options.threads
        )
        base = measure(loaded.model, loaded.tokenizer)
        demo = DemoResult(num_layers_before=get_adapter(loaded.model).num_layers, options=asdict(options))
        demo.base = {name: task.metrics for name, task in base.tasks.items()}
        for variant in VARIANTS:
            pruned, result = pruned_copy(loaded, variant, options)
            table = measure(pruned.model, pruned.tokenizer).compare(base)
            demo.removed[variant.name] = result.removed
            demo.comparisons[variant.name] = [row.to_dict() for row in table.rows]
            if variant.name == SAVED:
                save_pruned(pruned.model, pruned.tokenizer, tmp / "model", result.record)
                reloaded = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=pruned.model.dtype)
                reloaded.to(pruned.model.device).eval()
                probe = pruned.tokenizer(["The tide comes in twice a day."], return_tensors="pt")
                probe = probe.to(reloaded.device)
                with torch.no_grad():
                    difference = (reloaded(**probe).logits - pruned.model(**probe).logits).abs().max().item()
                demo.max_logit_difference_after_reload = difference
            del pruned
        demo.wall_time_s = round(time.perf_counter() - started, 1)
        provenance = Provenance.now(DEMO_FORMAT, model=loaded.source)
        summary = {**provenance.to_dict(), **asdict(demo), "summary": demo.lines()}
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write_text(tmp / "summary.txt", "\n".join(demo.lines()) + "\n")
    return demo
