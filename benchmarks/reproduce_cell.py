"""Reproduce one study cell by hand: `avss prune MODEL --layers ...` then `avss eval` on the study's examples.

A reader who doubts a number in a study table can rerun it with the two public commands. This script does
exactly that for a recorded cell and compares the result with the cell's stored evaluation, metric by metric
and example by example (per-option scores, per-document NLL, examples whose outcome changed), and writes what
it found as JSON. The cell ``base`` evaluates the unpruned model with ``avss eval`` alone: on another
processor it measures how far that machine's kernels move the numbers a study's cells are compared with.

    .venv/bin/python benchmarks/reproduce_cell.py benchmarks/study_protocol_smollm2_bf16 \
        block_influence__oneshot__0.125 --out benchmarks/reproduce_cell_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from avss.evaluation import get_task
from avss.io import atomic_write_json
from avss.provenance import command_line, machine, utc_now
from avss.study.analysis import load_evaluations

AVSS = str(Path(sys.executable).with_name("avss"))


def run(arguments: list[str]) -> float:
    """Run one avss command; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([AVSS, *arguments], check=True)
    return round(time.perf_counter() - started, 1)


def largest_difference(recorded: list[dict], again: list[dict]) -> float:
    """Largest absolute difference between the two files' per-example numbers (option scores, NLL)."""
    if [r["id"] for r in recorded] != [r["id"] for r in again]:
        raise SystemExit("the reproduction scored other examples than the cell")
    worst = 0.0
    for a, b in zip(recorded, again, strict=True):
        for key in ("scores", "nll"):
            if a.get(key) is not None:
                values_a = a[key] if isinstance(a[key], list) else [a[key]]
                values_b = b[key] if isinstance(b[key], list) else [b[key]]
                worst = max(worst, *(abs(x - y) for x, y in zip(values_a, values_b, strict=True)))
    return worst


def examples_changed(recorded: list[dict], again: list[dict], metric: str) -> int | None:
    """How many examples changed their ``metric`` value (an accuracy: changed side); None for perplexity."""
    if metric not in recorded[0].get("metrics", {}):
        return None
    return sum(a["metrics"][metric] != b["metrics"][metric] for a, b in zip(recorded, again, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("cell", help="cell key, e.g. block_influence__oneshot__0.125")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="folder for the pruned model (default: temp)")
    args = parser.parse_args()

    config = json.loads((args.study / "config.json").read_text())
    cell = json.loads((args.study / "cells" / f"{args.cell}.json").read_text())
    key = cell.get("reused_from") or args.cell
    recorded = load_evaluations(args.study, [key])[key].to_dict()
    work = args.work or Path(tempfile.mkdtemp(prefix="avss-reproduce-"))
    dtype = ["--dtype", config["dtype"]] if config.get("dtype") else []
    seconds = {}
    if cell["removed"]:
        pruned = work / "pruned"
        layers = ",".join(map(str, cell["removed"]))
        prune = ["prune", config["model"], "--layers", layers, "--out", str(pruned), "--overwrite", *dtype]
        seconds["prune"] = run(prune)
        model = str(pruned)
    else:
        model = config["model"]
    common = ["--batch-size", str(config["eval_batch_size"]), "--seed", str(config["seed"]), *dtype]
    common += ["--data-dir", config["data_dir"]] if config.get("data_dir") else []
    # One eval per (limit, task options) group: as in the study, each task takes the options it accepts.
    groups: dict[tuple, list[str]] = {}
    for task in config["tasks"]:
        accepted = {f.name for f in fields(get_task(task))}
        options = tuple((k, v) for k, v in config["task_options"].items() if k in accepted)
        groups.setdefault((config["limits"].get(task), options), []).append(task)
    again: dict[str, dict] = {}
    for (limit, options), tasks in groups.items():
        path = work / f"eval-{len(again)}.json"
        extra = ["--limit", str(limit)] if limit else []
        extra += [part for key, value in options for part in (f"--{key.replace('_', '-')}", str(value))]
        arguments = ["eval", model, "--tasks", ",".join(tasks), *extra, *common, "--out", str(path)]
        seconds[f"eval {','.join(tasks)}"] = run([*arguments, "--overwrite"])
        again.update(json.loads(path.read_text())["tasks"])

    rows = []
    for task, stored in recorded["tasks"].items():
        for metric, value in stored["metrics"].items():
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "cell": value,
                    "reproduced": again[task]["metrics"][metric],
                    "n": stored["num_examples"],
                    "max_abs_example_difference": largest_difference(
                        stored["records"], again[task]["records"]
                    ),
                    "examples_changed": examples_changed(stored["records"], again[task]["records"], metric),
                }
            )
    result = {
        "study": str(args.study),
        "cell": args.cell,
        "removed": cell["removed"],
        "date": utc_now(),
        "machine": machine(),
        "command": f"python benchmarks/{command_line()}",
        "seconds": seconds,
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    for row in rows:
        print(
            f"{row['task']:>16} {row['metric']:<14} cell {row['cell']:.6f} reproduced {row['reproduced']:.6f}"
            f" (largest per-example difference {row['max_abs_example_difference']:.2e}"
            + ("" if row["examples_changed"] is None else f", {row['examples_changed']} examples changed")
            + ")"
        )


if __name__ == "__main__":
    main()
