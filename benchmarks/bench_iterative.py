"""Iterative pruning with and without the hidden-state cache, on a real model.

Measures wall time of (a) iterative AVSS / block-influence pruning to a budget and (b) one leave-one-out NLL
scoring pass, each computed from the embeddings every time (``ScoringContext``) and from cached block inputs
(``CachedContext``), checks that both pick the same layers, and writes ``iterative_cache.{json,md}``.

    flock /tmp/avss-heavy.lock .venv/bin/python benchmarks/bench_iterative.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from avss.data import TextSource, tokenize_texts
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.provenance import describe_machine, machine, package_versions, utc_now
from avss.pruning.select import select_iteratively, select_oneshot
from avss.scorers import context_for, get_scorer


def timed(function, *args):
    started = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--remove", type=int, default=8, help="layers removed by the iterative runs")
    parser.add_argument("--methods", default="avss,block_influence")
    parser.add_argument("--out", default=str(Path(__file__).parent / "iterative_cache"))
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    batches = list(
        tokenize_texts(
            loaded.tokenizer, TextSource().load(), samples=args.samples, max_length=args.max_length
        )
    )
    runs = []
    for method in args.methods.split(","):
        scorer = get_scorer(method)
        result = {"method": scorer.spec, "kind": f"iterative, remove {args.remove}"}
        for cached in (False, True):
            context = context_for(copy.deepcopy(loaded.model), batches, [scorer], cached=cached)
            selection, seconds = timed(select_iteratively, scorer, context, args.remove)
            result["cached" if cached else "recompute"] = {
                "seconds": round(seconds, 2),
                "order": selection.order,
            }
            print(method, "cached" if cached else "recompute", round(seconds, 1), selection.order, flush=True)
        runs.append(result)
    scorer = get_scorer("loo_nll")
    result = {"method": "loo_nll", "kind": "one-shot scoring (every block skipped once)"}
    for cached in (False, True):
        context = context_for(loaded.model, batches, [scorer], cached=cached)
        selection, seconds = timed(select_oneshot, scorer, context, args.remove)
        scores = selection.steps[0].scores
        result["cached" if cached else "recompute"] = {
            "seconds": round(seconds, 2),
            "order": selection.order,
            "scores": scores.tolist(),
        }
        print("loo_nll", "cached" if cached else "recompute", round(seconds, 1), selection.order, flush=True)
    runs.append(result)
    for run in runs:
        run["same_selection"] = run["cached"]["order"] == run["recompute"]["order"]
        run["speedup"] = round(run["recompute"]["seconds"] / run["cached"]["seconds"], 2)
    report = {
        "model": loaded.source,
        "calibration": {
            "source": "bundled corpus",
            "samples": args.samples,
            "max_length": args.max_length,
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        },
        "runs": runs,
        "machine": machine(),
        "versions": package_versions(),
        "date": utc_now(),
        "command": "flock /tmp/avss-heavy.lock .venv/bin/python benchmarks/bench_iterative.py "
        f"--model {args.model} --samples {args.samples} --max-length {args.max_length} "
        f"--remove {args.remove} --methods {args.methods}",
    }
    atomic_write_json(f"{args.out}.json", report)
    lines = [
        "# Iterative pruning: hidden-state cache vs recomputing from the embeddings",
        "",
        f"Model `{args.model}`, calibration {report['calibration']['tokens']} tokens ({args.samples} x "
        f"{args.max_length}, bundled corpus), {report['date']}, {describe_machine(report['machine'])}, "
        "shared with other jobs.",
        "",
        "| method | run | recompute (s) | cached (s) | speed-up | same layers |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        recompute, cached = run["recompute"]["seconds"], run["cached"]["seconds"]
        same = "yes" if run["same_selection"] else "NO"
        lines.append(
            f"| {run['method']} | {run['kind']} | {recompute} | {cached} | {run['speedup']}x | {same} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    atomic_write_text(f"{args.out}.md", "\n".join(lines))


if __name__ == "__main__":
    main()
