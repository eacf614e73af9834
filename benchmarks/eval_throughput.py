"""Examples/s of ``truthfulqa_mc`` log-likelihood scoring at several batch sizes, with and without the
shared-context KV cache.

Run from the repository root (the first run converts the embedded GGUF model once, ~20 s):

    .venv/bin/python benchmarks/eval_throughput.py --limit 12 --batch-sizes 1,16 --threads 1

Each setting scores the same questions once after a short warm-up; metrics must agree across settings (they
are the same computation, only grouped differently), and the script checks that they do.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

from avss.data import resolve_data_dir
from avss.evaluation import LanguageModel, get_task
from avss.models import load_model
from avss.provenance import describe_machine, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=12, help="questions scored per setting")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    task = get_task("truthfulqa_mc")()
    pool, _ = task.load(resolve_data_dir(args.data_dir))
    docs = pool[: args.limit]
    requests = {request for doc in docs for request in task.requests(doc, [])}
    print(f"model {args.model}; {len(docs)} questions, {len(requests)} distinct (context, answer) pairs")
    print(f"torch {torch.__version__}, {describe_machine(machine())}")

    warmup = LanguageModel(loaded.model, loaded.tokenizer, batch_size=4)
    task.run(warmup, docs[:2], pool, seed=0)

    print("\n| batch size | shared context | seconds | questions/s | pairs/s | speed-up | MC1 | MC2 |")
    print("|---:|:---:|---:|---:|---:|---:|---:|---:|")
    reference = None
    baseline_seconds = None
    for share, batch_size in itertools.product((False, True), map(int, args.batch_sizes.split(","))):
        lm = LanguageModel(loaded.model, loaded.tokenizer, batch_size=batch_size, share_context=share)
        start = time.perf_counter()
        metrics = task.run(lm, docs, pool, seed=0)
        seconds = time.perf_counter() - start
        baseline_seconds = baseline_seconds or seconds
        if reference is None:
            reference = metrics
        assert all(abs(metrics[k] - reference[k]) < 1e-4 for k in metrics), (metrics, reference)
        cells = [
            str(batch_size),
            "yes" if share else "no",
            f"{seconds:.1f}",
            f"{len(docs) / seconds:.2f}",
            f"{len(requests) / seconds:.1f}",
            f"{baseline_seconds / seconds:.2f}x",
            f"{metrics['mc1']:.4f}",
            f"{metrics['mc2']:.4f}",
        ]
        print(f"| {' | '.join(cells)} |")
    print(f"\nload average after the run: {os.getloadavg()[0]:.1f} (CPU shared with other jobs)")


if __name__ == "__main__":
    main()
