"""Resident memory of one statistics pass after each batch: flat memory, or growth with the data?

Peak RSS of a whole pass (``bench_stats.py``) mixes the pass's own memory with glibc's allocator state, which
moves by tens of MB from run to run. This probe runs a single :class:`~avss.stats.collect.StatisticsCollector`
over many batches in one process and prints the RSS after selected batches: growth with the data would show as
a rising column, allocator noise as a fluctuating one.

    python benchmarks/bench_stats_rss.py --model smollm2-135m --tokens 60000
"""

from __future__ import annotations

import argparse

import psutil
import torch
from bench_stats import add_model_options, load_model_and_batches

from avss.stats.collect import StatisticsCollector


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_options(parser)
    parser.add_argument("--tokens", type=int, default=60000)
    args = parser.parse_args()
    loaded, batches = load_model_and_batches(args, args.tokens)
    process = psutil.Process()
    print(f"model loaded: RSS {process.memory_info().rss >> 20} MB")
    print("| batches | tokens | RSS MB |\n|---:|---:|---:|")
    report = {1, 2, 3, 5, len(batches)} | set(range(10, len(batches), 10))
    tokens = 0
    with torch.no_grad(), StatisticsCollector(loaded.model) as collector:
        for index, batch in enumerate(batches, start=1):
            collector.observe(batch)
            tokens += int(batch["attention_mask"].sum())
            if index in report:
                print(f"| {index} | {tokens} | {process.memory_info().rss >> 20} |", flush=True)


if __name__ == "__main__":
    main()
