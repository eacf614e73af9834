"""DoLa settings side by side on TruthfulQA MC (MC1, MC2): the authors' ``paper`` setting, avss's previous
``avss_v1`` and the plain model, on the same questions, with 95% intervals and the paired difference.

The statistics are the library's (``avss.evaluation.uncertainty``): MC1 gets a Wilson interval, MC2 a
percentile bootstrap over questions, every pairwise difference a paired bootstrap (10,000 resamples) and,
for MC1, an exact McNemar p. Writes a JSON with the per-question metrics, options, data hash, model, git
hash and machine. See dola_settings.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from avss.data import resolve_data_dir
from avss.evaluation import LanguageModel, get_task
from avss.evaluation.uncertainty import (
    RESAMPLES,
    Bootstrap,
    bootstrap_mean,
    mcnemar,
    paired_difference,
    wilson_interval,
)
from avss.hallucination.dola import DOLA_SETTINGS, DolaConfig, DolaModel
from avss.io import atomic_write_json
from avss.models import load_model
from avss.provenance import command_line, machine, utc_now

HERE = Path(__file__).parent


def score(model, tokenizer, task, docs, batch_size: int) -> list[dict[str, float]]:
    per_doc = [task.requests(doc, []) for doc in docs]
    flat = LanguageModel(model, tokenizer, batch_size=batch_size).loglikelihood(
        [request for requests in per_doc for request in requests]
    )
    results, start = [], 0
    for doc, requests in zip(docs, per_doc, strict=True):
        results.append(task.score(doc, flat[start : start + len(requests)]))
        start += len(requests)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", default="paper,avss_v1,base", help=f"{', '.join(DOLA_SETTINGS)}, base")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of the file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=RESAMPLES)
    parser.add_argument("--out", type=Path, default=HERE / "dola_settings.json")
    args = parser.parse_args()
    names = args.settings.split(",")
    bootstrap = Bootstrap(resamples=args.resamples)
    configs = {name: None if name == "base" else DolaConfig.named(name) for name in names}  # fail early

    loaded = load_model(args.model, device="cpu", dtype="float32")
    task = get_task("truthfulqa_mc")()
    pool, files = task.load(resolve_data_dir(None))
    docs = pool[: args.limit]
    record: dict = {
        "date_utc": utc_now(),
        "command": f"python benchmarks/{command_line()}",
        "model": loaded.source,
        "data": {
            "files": [asdict(f) for f in files],
            "questions": len(docs),
        },
        "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": machine(),
        "settings": {},
    }
    per_question: dict[str, dict[str, np.ndarray]] = {}
    for name, config in configs.items():
        model = loaded.model if config is None else DolaModel(loaded.model, config)
        started = time.perf_counter()
        results = score(model, loaded.tokenizer, task, docs, args.batch_size)
        seconds = time.perf_counter() - started
        values = {m: np.array([r[m] for r in results]) for m in ("mc1", "mc2")}
        per_question[name] = values
        n = len(docs)
        record["settings"][name] = {
            "options": None if config is None else config.to_dict(),
            "candidates": None if config is None else model.candidates,
            "picked_counts": None if config is None else {str(k): v for k, v in model.picked_counts.items()},
            "n": n,
            "mc1": wilson_interval(int(values["mc1"].sum()), n).to_dict(),
            "mc2": bootstrap_mean(values["mc2"], bootstrap).to_dict(),
            "seconds": round(seconds, 1),
            "per_question": {m: v.tolist() for m, v in values.items()},
        }
        print(
            name,
            {k: record["settings"][name][k] for k in ("mc1", "mc2", "seconds")},
            flush=True,
        )
    record["differences"] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for metric in ("mc1", "mc2"):
                first, second = per_question[a][metric], per_question[b][metric]
                difference = paired_difference(second, first, bootstrap).to_dict()
                if metric == "mc1":
                    difference["mcnemar_p"] = mcnemar(second, first).p_value
                record["differences"][f"{a} - {b} {metric}"] = difference
    atomic_write_json(args.out, record)
    print(json.dumps(record["differences"], indent=1))


if __name__ == "__main__":
    main()
