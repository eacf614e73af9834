"""Cost of one statistics checkpoint (``avss score --checkpoint-every N``): save, restore, file size.

Statistics are per-layer scalars plus an (L+1)^2 angular matrix, so the cost depends on the number of layers
and sites, not on the hidden size or the amount of text. The stats are filled with random float64 values of
the real shapes (30 layers like SmolLM2-135M, 18 like Gemma-3-270M; all four sites, the two default
thresholds), so no model is needed. Usage: ``.venv/bin/python benchmarks/bench_checkpoint.py [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from avss.io import atomic_write_json, atomic_write_text
from avss.provenance import command_line, describe_machine, machine, utc_now
from avss.stats.accumulators import ActivationStats, Threshold
from avss.stats.checkpoint import StatisticsCheckpoint
from avss.stats.collect import DEFAULT_THRESHOLDS

HERE = Path(__file__).resolve().parent
SITES = ("block", "delta", "mlp", "attn")


def filled_stats(num_layers: int) -> ActivationStats:
    stats = ActivationStats.empty(num_layers, SITES, tuple(Threshold.parse(t) for t in DEFAULT_THRESHOLDS))
    generator = torch.Generator().manual_seed(0)
    for tensors in [site.tensors() for site in stats.sites.values()] + [stats.relations.tensors()]:
        for tensor in tensors.values():
            tensor.copy_(torch.rand(tensor.shape, dtype=tensor.dtype, generator=generator))
    return stats


def measure(num_layers: int, repeats: int) -> dict[str, float]:
    stats = filled_stats(num_layers)
    run = {"model": {"name": f"{num_layers}-layer"}, "calibration": {"samples": 64}}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = StatisticsCheckpoint(Path(folder) / "scores.json.checkpoint.json", resume=True)
        saves, restores = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            checkpoint.save(run, stats, 4)
            saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            restored = checkpoint.restore(run)
            restores.append(time.perf_counter() - started)
        assert restored.stats is not None and restored.stats.state_dict() == stats.state_dict()
        size = checkpoint.path.stat().st_size
    return {
        "layers": num_layers,
        "save_ms_median": round(1000 * statistics.median(saves), 2),
        "restore_ms_median": round(1000 * statistics.median(restores), 2),
        "file_kib": round(size / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = [measure(layers, args.repeats) for layers in (18, 30)]
    result = {
        "benchmark": "checkpoint_overhead",
        "command": f"python benchmarks/{command_line()}",
        "date": utc_now(),
        "machine": machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sites": SITES,
        "thresholds": DEFAULT_THRESHOLDS,
        "rows": rows,
    }
    atomic_write_json(HERE / "checkpoint_overhead.json", result)
    lines = [
        "# Statistics checkpoint cost",
        "",
        f"Measured {result['date']} with `{result['command']}` on "
        + describe_machine(result["machine"])
        + f" (torch {torch.__version__}; shared machine, 1-min load {result['load_average_1min']})."
        + f" Median of {args.repeats} saves and restores of statistics with "
        "all four sites; the cost does not depend on hidden size or text length.",
        "",
        "| layers | save (ms) | restore (ms) | file (KiB) |",
        "|---|---|---|---|",
        *[
            f"| {r['layers']} | {r['save_ms_median']} | {r['restore_ms_median']} | {r['file_kib']} |"
            for r in rows
        ],
        "",
    ]
    atomic_write_text(HERE / "checkpoint_overhead.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
