"""What a study would save by preparing each task's examples once instead of once per cell.

Every cell of ``avss study`` reads its tasks' files, draws the same seeded examples, builds the same prompts
and tokenizes them again before any forward pass. This times exactly that per-cell preparation for a study
folder's tasks, limits and seed (reading and sampling, prompts, the engine's own tokenization of every
request or text), and sets it against the wall time of the study's recorded cells. The JSON and Markdown
beside ``--out`` say when, where and how (``--note`` for what else ran on the machine).

    .venv/bin/python benchmarks/bench_tokenize.py benchmarks/study_protocol_smollm2_bf16 \
        --out benchmarks/tokenize_smollm2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from avss.evaluation import get_task
from avss.evaluation.engine import LanguageModel
from avss.evaluation.tasks.perplexity import PerplexityTask
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.provenance import command_line, describe_machine, machine, utc_now


def preparation_seconds(task_name: str, config: dict[str, Any], lm: LanguageModel) -> dict[str, Any]:
    """Read, sample, prompt and tokenize one task as a study cell does; the engine's encoders are private,
    and used here because they are exactly the per-cell work in question."""
    task = get_task(task_name)()
    started = time.perf_counter()
    pool, _ = task.load(Path(config["data_dir"]))
    docs = task.select(pool, config["limits"].get(task_name), config["seed"])
    if isinstance(task, PerplexityTask):
        tokens, _ = lm._encode_texts([doc["text"] for doc in docs])
        units = len(tokens)
    else:
        requests = [request for doc in docs for request in task.requests(doc, [])]
        for request in requests:
            lm.encode_request(request)
        units = len(requests)
    return {
        "task": task_name,
        "examples": len(docs),
        "units": units,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record")
    args = parser.parse_args()
    config = json.loads((args.study / "config.json").read_text(encoding="utf-8"))
    loaded = load_model(config["model"], device="cpu", dtype=config.get("dtype", "auto"))
    lm = LanguageModel(loaded.model, loaded.tokenizer)
    rounds = [[preparation_seconds(task, config, lm) for task in config["tasks"]] for _ in range(args.rounds)]
    per_round = [sum(row["seconds"] for row in tasks) for tasks in rounds]
    cells = [json.loads(path.read_text(encoding="utf-8")) for path in (args.study / "cells").glob("*.json")]
    evaluated = [cell["seconds"] for cell in cells if not cell.get("reused_from") and cell.get("seconds")]
    cell_median = statistics.median(evaluated)
    result = {
        "command": f"python benchmarks/{command_line()}",
        "date": utc_now(),
        "machine": machine(),
        "python": sys.version,
        "study": str(args.study),
        "tasks": rounds[-1],
        "preparation_s_per_cell": {"min": min(per_round), "max": max(per_round), "rounds": args.rounds},
        "evaluated_cells": len(evaluated),
        "cell_wall_s_median": cell_median,
        "share_of_a_cell": min(per_round) / cell_median,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    lines = [
        f"# Per-cell preparation of `{args.study.name}`'s tasks",
        "",
        f"`{result['command']}` on {result['date']} ({describe_machine(result['machine'])}). {args.note}",
        "",
        "| task | examples | requests or tokens | seconds |",
        "|---|---|---|---|",
        *(f"| {r['task']} | {r['examples']} | {r['units']} | {r['seconds']:.2f} |" for r in rounds[-1]),
        "",
        f"Preparation per cell: {min(per_round):.2f}-{max(per_round):.2f} s over {args.rounds} rounds; "
        f"median wall time of the study's {len(evaluated)} evaluated cells {cell_median:.0f} s, so preparing "
        f"once per study would save {result['share_of_a_cell']:.1%} of a cell.",
        "",
    ]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
