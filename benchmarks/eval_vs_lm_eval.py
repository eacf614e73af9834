"""Wall time of ``avss eval`` against lm-evaluation-harness on the same model, items and machine.

For each task the first ``--limit`` rows of the shared file are written twice: in our layout (so ``avss eval``
without ``--limit`` scores exactly them) and, through :func:`avss.evaluation.harness.write_local_task`, as
lm-eval's own task config pointed at the same rows. Both tools then run as whole processes (start-up and model
load included, as a user sees them), one after the other, ``--rounds`` times, and the script checks that they
measured the same thing: equal accuracies and every option's log-likelihood equal to float32 tolerance.
``--busy`` keeps one core busy with a spinning process during every run (a shared machine).

Run from the repository root, with lm-eval installed in the same environment (``pip install lm-eval``):

    .venv/bin/python benchmarks/eval_vs_lm_eval.py --model smollm2-135m \
        --tasks sciq,arc_easy,piqa,winogrande --limit 100 --out benchmarks/eval_vs_lm_eval_smollm2.json

Timings are never asserted anywhere; they are recorded with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from avss.data import read_jsonl, resolve_data_dir
from avss.evaluation import get_task
from avss.evaluation.harness import sciq_hub_order, write_local_task
from avss.io import atomic_write_json
from avss.models import resolve_model_path
from avss.provenance import machine, package_versions, utc_now

BIN = Path(sys.executable).parent
# lm-eval's metric names for ours.
METRICS = {"accuracy": "acc", "accuracy_norm": "acc_norm"}


def _spin() -> None:
    while True:
        pass


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _lm_eval_outputs(folder: Path, name: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The metrics and per-document samples of the newest lm-eval run of task ``name`` in ``folder``."""
    results = max(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads(results.read_text())["results"][name]
    samples = max(folder.rglob(f"samples_{name}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    return metrics, read_jsonl(samples)


def compare(task: str, rows: list[dict[str, Any]], ours: dict[str, Any], theirs: tuple) -> dict[str, Any]:
    """Both tools' accuracies and the largest difference between their per-option log-likelihoods."""
    metrics, samples = theirs
    records = ours["tasks"][task]["records"]
    worst = 0.0
    for sample in samples:
        scores = records[sample["doc_id"]]["scores"]
        if task == "sciq":
            scores = [scores[i] for i in sciq_hub_order(rows[sample["doc_id"]])]
        theirs_scores = [float(logprob) for logprob, _ in sample["filtered_resps"]]
        worst = max(worst, *(abs(a - b) for a, b in zip(scores, theirs_scores, strict=True)))
    ours_metrics = ours["tasks"][task]["metrics"]
    return {
        "avss": {name: ours_metrics[name] for name in METRICS if name in ours_metrics},
        "lm_eval": {
            name: metrics[f"{key},none"] for name, key in METRICS.items() if f"{key},none" in metrics
        },
        "max_abs_logprob_difference": worst,
        "documents": len(samples),
    }


def avss_command(model: Path, task: str, data_dir: Path, batch_size: int, out: Path) -> list[str]:
    return [str(BIN / "avss"), "eval", str(model), "--tasks", task, "--data-dir", str(data_dir),
            "--batch-size", str(batch_size), "--device", "cpu", "--dtype", "float32",
            "--out", str(out)]  # fmt: skip


def lm_eval_command(model: Path, task: str, include: Path, batch_size: int) -> list[str]:
    return [str(BIN / "lm_eval"), "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
            "--tasks", task, "--include_path", str(include), "--batch_size", str(batch_size),
            "--device", "cpu", "--output_path", str(include / "lm_eval"), "--log_samples"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or safetensors folder")
    parser.add_argument("--tasks", default="sciq,arc_easy,piqa,winogrande")
    parser.add_argument("--limit", type=int, default=100, help="first N rows of each task's shared file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--busy", action="store_true", help="keep one core busy during every run")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the figures")
    args = parser.parse_args()

    location, _ = resolve_model_path(args.model)
    data_dir = resolve_data_dir(args.data_dir)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    spinner = multiprocessing.Process(target=_spin, daemon=True) if args.busy else None
    if spinner:
        spinner.start()
    figures: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            for task in args.tasks.split(","):
                relative = next(iter(get_task(task).files.values()))
                rows = read_jsonl(data_dir / relative)[: args.limit]
                ours_file = root / "data" / relative
                ours_file.parent.mkdir(parents=True, exist_ok=True)
                ours_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
                name = write_local_task(root, task, rows)
                result = root / f"{task}.avss.json"
                avss = avss_command(location, task, root / "data", args.batch_size, result)
                harness = lm_eval_command(location, name, root, args.batch_size)
                times: dict[str, list[float]] = {"avss": [], "lm_eval": []}
                for _ in range(args.rounds):
                    times["avss"].append(_timed(avss, env))
                    times["lm_eval"].append(_timed(harness, env))
                ours = json.loads(result.read_text())
                check = compare(task, rows, ours, _lm_eval_outputs(root / "lm_eval", name))
                best = {tool: min(values) for tool, values in times.items()}
                figures[task] = {
                    "seconds": times,
                    "speedup": best["lm_eval"] / best["avss"],
                    **check,
                    "avss_threads": (ours.get("model") or {}).get("threads"),  # --threads auto's choice
                    "commands": {"avss": shlex.join(avss), "lm_eval": shlex.join(harness)},
                }
                print(
                    f"{task}: avss {best['avss']:.1f} s, lm-eval {best['lm_eval']:.1f} s "
                    f"({figures[task]['speedup']:.2f}x); accuracy {check['avss']} vs {check['lm_eval']}; "
                    f"max |dlogprob| {check['max_abs_logprob_difference']:.2e}",
                    flush=True,
                )
    finally:
        if spinner:
            spinner.terminate()
    record = {
        "what": "whole-process wall time of avss eval and lm-eval on the same rows, float32, CPU",
        "model": args.model,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "busy_core": args.busy,
        "date": utc_now(),
        "machine": machine(),
        "versions": {**package_versions(), "lm_eval": _version("lm_eval")},
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "tasks": figures,
        "geometric_mean_speedup": math.exp(
            sum(math.log(f["speedup"]) for f in figures.values()) / len(figures)
        ),
    }
    atomic_write_json(args.out, record)


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
