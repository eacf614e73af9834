"""What one study cell of a larger model will cost here, measured rather than guessed.

A full cell (1,000 examples of each accuracy task and the whole WikiText-2 test set) of a 1.5B model takes
hours on a 2-core CPU, so it is planned from a small run: every model scores the same ``--limit`` examples
of each task of the study (same seeded sample, same precision, same threads), one after the other on a
quiet machine; each task's time relative to the reference model, times the reference model's recorded
full-cell time for that task (``--reference``, a study's ``cells/*.eval.json.gz`` run on this processor),
projects the full cell. The projection assumes a task's cost scales like its small sample, which holds for
compute-bound forward passes of the same examples. Usage::

    python benchmarks/cell_cost.py --models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b \\
        --reference benchmarks/study_protocol_qwen05b_bf16/cells/base@AMD-EPYC.eval.json.gz \\
        --data-dir ../shared/data --limit 40 --out benchmarks/cell_cost_qwen

writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

from avss.evaluation import evaluate
from avss.evaluation.runner import EvalResult
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.provenance import command_line, describe_machine, machine, utc_now

TASKS = "sciq,arc_easy,piqa,lambada_openai,wikitext2"


def measure(model: str, tasks: list[str], limit: int, dtype: str, data_dir: str | None) -> dict[str, Any]:
    """Seconds per task for ``limit`` examples of each, with the model loaded once beforehand."""
    loaded = load_model(model, device="cpu", dtype=dtype)
    seconds = {}
    for task in tasks:
        result = evaluate(loaded.model, loaded.tokenizer, [task], limit=limit, data_dir=data_dir, seed=0)
        seconds[task] = result.tasks[task].seconds
    info = {
        "model": model,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "seconds": seconds,
    }
    del loaded
    gc.collect()
    return info


def project(runs: list[dict[str, Any]], reference: EvalResult) -> list[dict[str, Any]]:
    """Each model's full-cell seconds per task: its sample time over the reference model's (the first
    run), times the reference's recorded full-cell time."""
    base = runs[0]["seconds"]
    recorded = {task: result.seconds for task, result in reference.tasks.items()}
    return [
        {
            "model": run["model"],
            "ratio": {task: run["seconds"][task] / base[task] for task in base},
            "projected_s": {task: run["seconds"][task] / base[task] * recorded[task] for task in base},
        }
        for run in runs
    ]


def markdown(record: dict[str, Any]) -> str:
    tasks = list(record["runs"][0]["seconds"])
    lines = [
        "# Projected cost of one study cell per model",
        "",
        f"{record['created']}, {describe_machine(record['machine'])}, "
        f"{record['dtype']}. Command: `{record['command']}`",
        "",
        f"Measured: seconds for the same {record['limit']} examples of each task (WikiText-2: the first "
        f"{record['limit']} documents), each model loaded once, nothing else running. Projected: that time "
        "over the reference model's, times the reference's full-cell time on this processor "
        f"(`{record['reference']}`: 1,000 examples per accuracy task, all 2,891 WikiText-2 documents).",
        "",
        "| model | parameters | " + " | ".join(f"{t} s (x ref)" for t in tasks) + " | projected full cell |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for run, projection in zip(record["runs"], record["projections"], strict=True):
        cells = [f"{run['seconds'][t]:.1f} (x{projection['ratio'][t]:.2f})" for t in tasks]
        total = sum(projection["projected_s"].values())
        without_wikitext = total - projection["projected_s"].get("wikitext2", 0.0)
        lines.append(
            f"| {run['model']} | {run['parameters'] / 1e6:.0f}M | "
            + " | ".join(cells)
            + f" | {total / 3600:.2f} h"
            f" ({without_wikitext / 3600:.2f} h without WikiText-2) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", required=True, help="comma-separated; the first is the reference")
    parser.add_argument("--reference", type=Path, required=True, help="the first model's full cell here")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes OUT.json and OUT.md")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    reference = EvalResult.load(args.reference)
    runs = [measure(model, tasks, args.limit, args.dtype, args.data_dir) for model in args.models.split(",")]
    record = {
        "created": utc_now(),
        "machine": machine(),
        "command": f"python benchmarks/{command_line()}",
        "limit": args.limit,
        "dtype": args.dtype,
        "reference": str(args.reference),
        "runs": runs,
        "projections": project(runs, reference),
    }
    atomic_write_json(args.out.with_suffix(".json"), record)
    atomic_write_text(args.out.with_suffix(".md"), markdown(record))
    print(args.out.with_suffix(".md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
