"""Study cells with and without the shared prefix: wall time of each, and the proof that nothing changed.

For recorded cells of a study folder, evaluates the pruned model twice on the study's tasks and examples:
with full forward passes, and run from the unpruned model's recorded block inputs (the way ``avss study``
runs its cells, :mod:`avss.evaluation.prefix`), and checks that every per-example record is identical. The
unpruned model's evaluation is timed with and without recording (the cost of recording). Run it on a quiet
machine; the JSON and Markdown beside ``--out`` say when, where and how.

    .venv/bin/python benchmarks/bench_prefix.py benchmarks/study_protocol_smollm2_bf16 \
        --cells block-influence__oneshot__0.25,loo-nll__oneshot__0.25,random-seed-3__oneshot__0.25 \
        --out benchmarks/prefix_smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from avss.adapters import get_adapter, remove_layers
from avss.evaluation import evaluate, get_task
from avss.evaluation.prefix import PrefixStore, choose_starts, start_for
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.provenance import command_line, describe_machine, machine, utc_now


def evaluate_study_tasks(
    config: dict[str, Any], loaded: Any, model: Any, around: Callable[[str], Any] | None = None
) -> tuple[dict[str, Any], float]:
    """Every task of the study on ``model`` as the study evaluates it; the records and the wall time."""
    records, started = {}, time.perf_counter()
    for task in config["tasks"]:
        accepted = {f.name for f in fields(get_task(task))}
        options = {k: v for k, v in config["task_options"].items() if k in accepted}
        with around(task) if around else contextlib.nullcontext():
            result = evaluate(
                model,
                loaded.tokenizer,
                [task],
                limit=config["limits"].get(task),
                batch_size=config["eval_batch_size"],
                data_dir=config["data_dir"],
                seed=config["seed"],
                **options,
            )
        records[task] = [record.to_dict() for record in result.tasks[task].records]
    return records, round(time.perf_counter() - started, 1)


def replaying(store: PrefixStore, model: Any, start: int) -> Callable[[str], Any] | None:
    """Run ``model`` from block ``start`` on the recorded inputs (None from block 0: the whole model)."""
    return (lambda task: store.replay(model, task, start)) if start else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--cells", required=True, help="comma-separated cell keys of the study")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix for .json and .md")
    args = parser.parse_args()
    config = json.loads((args.study / "config.json").read_text())
    cells = {
        key: json.loads((args.study / "cells" / f"{key}.json").read_text()) for key in args.cells.split(",")
    }
    loaded = load_model(config["model"], dtype=config.get("dtype") or "auto")
    starts = choose_starts([min(cell["removed"]) for cell in cells.values()])
    store = PrefixStore(Path(tempfile.mkdtemp(prefix="avss-prefix-")), starts)
    base = loaded.model
    _, base_s = evaluate_study_tasks(config, loaded, base)
    _, recording_s = evaluate_study_tasks(config, loaded, base, lambda task: store.record(base, task))
    rows = []
    for key, cell in cells.items():
        pruned = copy.deepcopy(base)
        remove_layers(pruned, cell["removed"])
        start = start_for(min(cell["removed"]), starts, get_adapter(pruned).num_layers)
        full, full_s = evaluate_study_tasks(config, loaded, pruned)
        shared, shared_s = evaluate_study_tasks(config, loaded, pruned, replaying(store, pruned, start))
        rows.append(
            {
                "cell": key,
                "removed": cell["removed"],
                "start": start,
                "full_s": full_s,
                "shared_s": shared_s,
                "ratio": round(shared_s / full_s, 3),
                "identical_records": full == shared,
            }
        )
        print(rows[-1], flush=True)
    result = {
        "study": str(args.study),
        "date": utc_now(),
        "machine": machine(),
        "command": f"python benchmarks/{command_line()}",
        "starts": starts,
        "base_s": base_s,
        "base_recording_s": recording_s,
        "cells": rows,
    }
    atomic_write_json(args.out.with_suffix(".json"), result)
    lines = [
        f"# Study cells with and without the shared prefix ({args.study.name})",
        "",
        f"{result['date']}, {describe_machine(result['machine'])}. Command: `{result['command']}`.",
        f"Recorded blocks {starts}; the unpruned model's evaluation: {base_s} s ({recording_s} s recording).",
        "",
        "| cell | removed | runs from block | full s | shared s | ratio | records identical |",
        "|---|---|---:|---:|---:|---:|---|",
        *(
            f"| {r['cell']} | {' '.join(map(str, r['removed']))} | {r['start']} | {r['full_s']}"
            f" | {r['shared_s']} | {r['ratio']} | {r['identical_records']} |"
            for r in rows
        ),
        "",
    ]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines))


if __name__ == "__main__":
    main()
