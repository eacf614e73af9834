"""Raw-accuracy retention of recorded study cells, the figure depth-pruning papers print as "%".

ReplaceMe, ShortGPT and LLM-Streamline report a pruned model's average accuracy over their tasks divided
by the unpruned model's (ReplaceMe: Llama 2 7B, 25% of the blocks, 0.619 / 0.673 = 91.9%). The studies
here report chance-normalized retention instead, which a reader cannot set beside those papers, so this
script computes the papers' figure from a study's per-example records: ``sum(pruned correct) / sum(base
correct)`` over the pooled examples of the named tasks (equal n per task makes it the ratio of task
averages), with a paired bootstrap over examples (each resample draws whole examples, both models'
outcomes together) from the library's own :class:`~avss.evaluation.uncertainty.Bootstrap`. Each cell is
divided by the unpruned model it is compared with in the study's ``results.json`` (``base_key``: the one
evaluated on the cell's own processor when the study holds it).

    .venv/bin/python benchmarks/raw_retention.py benchmarks/study_protocol_smollm2_bf16 \\
        --tasks sciq,arc_easy,piqa,lambada_openai --out benchmarks/raw_retention_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from avss.evaluation import comparison
from avss.evaluation.uncertainty import BOOTSTRAP, bootstrap_ratio, paired_ratio_difference
from avss.io import atomic_write_json
from avss.provenance import machine, utc_now
from avss.study import REPAIRS, slug
from avss.study.analysis import load_evaluations


def pooled(evaluation, tasks: list[str], ids: dict[str, list[str]] | None = None) -> tuple[np.ndarray, dict]:
    """Per-example accuracy of ``tasks`` in one fixed order (the base's ids when given)."""
    values, order = [], {}
    for task in tasks:
        by_id = comparison.metric_values(evaluation.tasks[task].records, "accuracy", task)
        order[task] = ids[task] if ids else sorted(by_id)
        values.extend(by_id[i] for i in order[task])
    return np.asarray(values, dtype=np.float64), order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--tasks", default="sciq,arc_easy,piqa,lambada_openai")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    keys = [
        path.name.removesuffix(".eval.json.gz")
        for path in sorted((args.study / "cells").glob("*.eval.json.gz"))
    ]
    evaluations = load_evaluations(args.study, keys)
    study_rows = json.loads((args.study / "results.json").read_text(encoding="utf-8"))["rows"]
    # The cell's key (avss.study.Cell.key) -> the unpruned model it is compared with; older studies: "base".
    base_of = {
        f"{slug(r['method'])}__{r['mode']}__{r['fraction']:g}": r.get("base_key", "base") for r in study_rows
    }
    base_values, ids = pooled(evaluations["base"], tasks)
    bases = {key: pooled(evaluations[key], tasks, ids)[0] for key in set(base_of.values())}
    values = {
        key: pooled(evaluation, tasks, ids)[0]
        for key, evaluation in evaluations.items()
        if key in base_of and not key.startswith("random")
    }
    rows = []
    for key in sorted(values):
        base = bases[base_of[key]]
        interval = bootstrap_ratio(values[key], base, BOOTSTRAP)
        row = {
            "cell": key,
            "base_key": base_of[key],
            "n": interval.n,
            "base_accuracy": base.mean(),
            "accuracy": values[key].mean(),
            "retention": interval.estimate,
            "low": interval.low,
            "high": interval.high,
        }
        plain = next((key.replace(repair, "") for repair in REPAIRS if repair in key), key)
        if plain != key and plain in values:
            # Repaired over base minus plain over base, all three on the same resampled examples.
            plain_base = bases[base_of[plain]]
            gain = paired_ratio_difference(values[plain], plain_base, values[key], base, BOOTSTRAP)
            row["gain_over"] = plain
            row.update(gain=gain.estimate, gain_low=gain.low, gain_high=gain.high)
        rows.append(row)
    record = {
        "format": "avss-raw-retention/1",
        "created": utc_now(),
        "study": str(args.study),
        "tasks": tasks,
        "machine": machine(),
        "bootstrap": {"resamples": BOOTSTRAP.resamples, "seed": BOOTSTRAP.seed},
        "rows": rows,
    }
    atomic_write_json(args.out, record)
    print(
        f"| cell | mean accuracy (base {base_values.mean():.3f}) | retained [95% CI] | repair gain [95% CI] |"
    )
    print("|---|---:|---|---|")
    for row in rows:
        gain = (
            f"{100 * row['gain']:+.1f} [{100 * row['gain_low']:+.1f}, {100 * row['gain_high']:+.1f}]"
            if "gain" in row
            else ""
        )
        print(
            f"| {row['cell']} | {row['accuracy']:.3f} | {100 * row['retention']:.1f}% "
            f"[{100 * row['low']:.1f}, {100 * row['high']:.1f}] | {gain} |"
        )


if __name__ == "__main__":
    main()
