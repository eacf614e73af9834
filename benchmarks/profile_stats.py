"""Where the statistics pass spends its time: torch.profiler over one pass, operators by self CPU time.

Runs the body forward alone and the statistics pass on the same batches (CPU time, one thread, so the
comparison does not depend on how the OS schedules two threads), then profiles the statistics pass. The
matrix products and attention are the forward; the comparisons, counts, sums and norms are the statistics.

    python benchmarks/profile_stats.py --model smollm2-135m --sequences 16
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_stats import add_model_options, load_model_and_batches, model_inputs
from torch.profiler import ProfilerActivity, profile

from avss.stats.collect import collect_statistics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_options(parser)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded, batches = load_model_and_batches(args, args.sequences * args.max_length)
    model = loaded.model
    inputs = [model_inputs(batch) for batch in batches]

    def body() -> None:
        for batch in inputs:
            model.base_model(**batch)

    def statistics() -> None:
        collect_statistics(model, batches, progress=False)

    with torch.no_grad():
        body(), statistics()  # warm-up
        for name, run in (("body forward", body), ("statistics pass", statistics)) * 2:
            started = time.process_time()
            run()
            print(f"{name}: {time.process_time() - started:.2f} s CPU")
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            statistics()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
