"""Healing benchmark: perplexity before pruning, after pruning, and after each healing method.

For each selection method (AVSS, ShortGPT block influence) and each removed fraction, the original model is
pruned in memory and healed with every method of :data:`avss.healing.heal.HEAL_METHODS` from the same pruned
copy, on WikiText-2 *valid* text, at the same training budget. Perplexity is measured on a capped prefix of
WikiText-2 *test* and on the bundled ``evaluation`` corpus, neither of which is used for scoring or training.

Every finished cell is written to ``results.json`` at once (atomically), and a rerun skips finished cells,
so the benchmark can run as several short jobs. ``--report`` rewrites README-ready markdown from the JSON.

    flock /tmp/avss-heavy.lock .venv/bin/python benchmarks/bench_heal.py --out benchmarks/heal_smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from avss.adapters import remove_layers
from avss.data import (
    CalibrationOptions,
    TextSource,
    bundled_text,
    resolve_data_dir,
    split_paragraphs,
    wikitext2_texts,
)
from avss.evaluation import perplexity
from avss.healing.heal import HealConfig, heal_in_memory
from avss.healing.methods import HEAL_METHODS
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.provenance import machine, package_versions, utc_now
from avss.pruning.rules import PruneSpec
from avss.scorers.run import ScoreOptions, score

SELECTIONS = ("avss", "block_influence")


def capped_texts(texts: list[str], max_chars: int) -> list[str]:
    """The first paragraphs of ``texts`` up to about ``max_chars`` characters."""
    kept, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        kept.append(text)
        total += len(text)
    return kept


def evaluate(model: Any, tokenizer: Any, corpora: dict[str, list[str]], args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    result = {
        name: perplexity(
            model, tokenizer, texts, max_length=args.eval_length, batch_size=args.eval_batch_size
        )
        for name, texts in corpora.items()
    }
    return {"perplexity": result, "eval_time_s": round(time.perf_counter() - started, 1)}


def layer_scores(loaded: Any, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """AVSS and block influence from one calibration pass over the bundled calibration corpus."""
    run = score(
        loaded,
        TextSource(),
        CalibrationOptions(samples=args.calibration_samples, max_length=256, batch_size=8),
        ScoreOptions(),
        progress=False,
    )
    return {"avss": run.scores.avss, "block_influence": run.stats.relations.block_influence}


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"cells": {}}


def nll_recovered(original: float, pruned: float, healed: float) -> float:
    """Share of the pruning's NLL increase (log perplexity) that healing gives back (1 = all, < 0 = worse)."""
    lost = math.log(pruned) - math.log(original)
    return (math.log(pruned) - math.log(healed)) / lost if lost > 0 else math.nan


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    path = out / "results.json"
    results = load_results(path)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    data_dir = resolve_data_dir(args.data_dir)
    corpora = {
        "wikitext2_test": capped_texts(wikitext2_texts(data_dir, "test"), args.eval_chars),
        "bundled_evaluation": split_paragraphs(bundled_text("evaluation")),
    }
    source = TextSource(data_dir=str(data_dir))
    training_texts = source.load()
    results.update(
        {
            "model": loaded.source,
            "date": utc_now(),
            "machine": machine(),
            "versions": package_versions(),
            "training_data": source.describe(),
            "evaluation": {
                "wikitext2_test": f"first {len(corpora['wikitext2_test'])} rows of wiki.test.raw "
                f"(~{args.eval_chars} characters), disjoint windows of {args.eval_length} tokens",
                "bundled_evaluation": f"avss.corpus evaluation.txt, windows of {args.eval_length} tokens",
            },
            "arguments": vars(args),
        }
    )
    results.setdefault("jobs", []).append({"started": results["date"], "arguments": vars(args)})
    if "original" not in results["cells"]:
        results["cells"]["original"] = evaluate(loaded.model, loaded.tokenizer, corpora, args)
        atomic_write_json(path, results)
    scores = layer_scores(loaded, args)
    for selection in args.selections:
        for fraction in args.fractions:
            removed = PruneSpec(fraction=fraction).select(scores[selection])
            key = f"{selection}@{fraction}"
            cell = results["cells"].setdefault(key, {"selection": selection, "fraction": fraction})
            cell["removed_layers"] = removed
            pruned = copy.deepcopy(loaded.model)
            remove_layers(pruned, removed)
            if "pruned" not in cell:
                cell["pruned"] = evaluate(pruned, loaded.tokenizer, corpora, args)
                atomic_write_json(path, results)
            for method in args.methods:
                if method in cell.get("healed", {}):
                    continue
                config = HealConfig(
                    method=method,
                    steps=args.steps,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    max_length=args.max_length,
                    validation_samples=args.validation_samples,
                    learning_rate=args.learning_rates.get(method),
                    target_modules=("all-linear",) if method == "lora" else None,
                    seed=args.seed,
                )
                healed = heal_in_memory(
                    copy.deepcopy(pruned),
                    loaded.tokenizer,
                    removed,
                    training_texts,
                    config,
                    teacher=loaded.model,
                    teacher_source=loaded.source,
                    data=source.describe(),
                    progress=False,
                )
                training = healed.record.training
                cell.setdefault("healed", {})[method] = {
                    **evaluate(healed.model, loaded.tokenizer, corpora, args),
                    "learning_rate": healed.record.config["learning_rate"],
                    "trained_layers": healed.record.trained_layers,
                    "trainable_parameters": healed.record.trainable_parameters,
                    "train_tokens_per_epoch": healed.record.num_train_tokens,
                    "steps": training["steps"],
                    "epochs_run": training["epochs_run"],
                    "best_epoch": training["best_epoch"],
                    "val_loss": training["val_loss"],
                    "train_time_s": training["wall_time_s"],
                    "peak_memory_mb": round(training["peak_memory_bytes"] / 2**20, 1),
                    "peak_memory_kind": training["peak_memory_kind"],
                    "optimizer_state_mb": round(training["optimizer_state_bytes"] / 2**20, 2),
                }
                atomic_write_json(path, results)
                print(key, method, cell["healed"][method]["perplexity"], flush=True)
    atomic_write_text(out / "table.md", report(results))


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report(results: dict[str, Any]) -> str:
    original = results["cells"]["original"]["perplexity"]
    corpora = list(original)
    header = [
        "selection",
        "removed",
        "state",
        *[f"ppl {c}" for c in corpora],
        *[f"NLL recovered {c}" for c in corpora],
        "steps",
        "train s",
        "peak RSS MB",
        "trainable params",
    ]
    lines = [markdown_row(header), "|" + "---|" * len(header)]
    blank = ["", "", "", ""]
    ppl_cells = lambda ppl: [f"{ppl[c]:.2f}" for c in corpora]  # noqa: E731
    lines.append(markdown_row(["original", "0", "-", *ppl_cells(original), *["-"] * len(corpora), *blank]))
    for key, cell in results["cells"].items():
        if key == "original" or "pruned" not in cell:
            continue
        pruned = cell["pruned"]["perplexity"]
        removed = f"{len(cell['removed_layers'])} ({cell['fraction']:g})"
        lines.append(
            markdown_row(
                [cell["selection"], removed, "pruned", *ppl_cells(pruned), *["0%"] * len(corpora), *blank]
            )
        )
        for method, healed in cell.get("healed", {}).items():
            ppl = healed["perplexity"]
            recovered = [nll_recovered(original[c], pruned[c], ppl[c]) for c in corpora]
            lines.append(
                markdown_row(
                    [
                        cell["selection"],
                        removed,
                        f"+{method}",
                        *ppl_cells(ppl),
                        *[f"{r:.0%}" for r in recovered],
                        str(healed["steps"]),
                        f"{healed['train_time_s']:.0f}",
                        f"{healed['peak_memory_mb']:.0f}",
                        f"{healed['trainable_parameters']:,}",
                    ]
                )
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="benchmarks/heal_smollm2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--selections", type=lambda s: s.split(","), default=list(SELECTIONS))
    parser.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.125, 0.25])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(HEAL_METHODS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--validation-samples", type=int, default=16)
    parser.add_argument("--learning-rates", type=json.loads, default={}, help='JSON, e.g. {"lora": 1e-3}')
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-chars", type=int, default=40000)
    parser.add_argument("--eval-length", type=int, default=256)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="only rewrite table.md from results.json")
    args = parser.parse_args()
    if args.report:
        out = Path(args.out)
        atomic_write_text(out / "table.md", report(load_results(out / "results.json")))
        return
    run(args)


if __name__ == "__main__":
    main()
