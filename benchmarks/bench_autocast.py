"""Training speed with and without bfloat16 autocast on CPU: the EAVSS mitigation loop of the CV study.

SmolLM2-135M in float32, blocks 2-5 trainable (the EAVSS choice of most folds), InfoNCE + LM loss on
TruthfulQA contrastive batches (4 questions x 3 answers, up to 128 tokens), AdamW at lr 1e-4. Each repeat
trains a fresh copy for ``--steps`` optimizer steps under each mode in turn (float32 first, then bfloat16
autocast, alternating so that drift in the machine's speed hits both), and records seconds per step and the
mean training loss, which shows whether the bfloat16 run optimizes the same objective.

    .venv/bin/python benchmarks/bench_autocast.py --data-dir ../shared/data --out benchmarks/autocast_smollm2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from avss.data import resolve_data_dir
from avss.hallucination.batches import contrastive_batches
from avss.hallucination.mitigate import ContrastiveObjective
from avss.hallucination.pairs import load_pairs
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.provenance import command_line, describe_machine, machine, utc_now
from avss.training import TrainConfig, prefix_selector, train

LAYERS = [2, 3, 4, 5]
MODES = ("off", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32", threads=args.threads)
    pairs = load_pairs(["truthfulqa"], resolve_data_dir(args.data_dir))[: 4 * args.steps]
    batches = contrastive_batches(loaded.tokenizer, pairs, negatives=2, max_length=128, questions_per_batch=4)
    objective = ContrastiveObjective(layers=LAYERS)
    selector = prefix_selector([f"model.layers.{i}" for i in LAYERS])
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            model = copy.deepcopy(loaded.model)
            config = TrainConfig(epochs=1, lr=1e-4, patience=None, autocast=mode, progress=False)
            started = time.perf_counter()
            result = train(model, objective, batches, trainable=selector, config=config)
            seconds = time.perf_counter() - started
            runs[mode].append({"s_per_step": seconds / result.steps, "train_loss": result.train_loss[0]})
            del model
    summary = {
        mode: {
            "median_s_per_step": statistics.median(r["s_per_step"] for r in rows),
            "train_loss": [r["train_loss"] for r in rows],
        }
        for mode, rows in runs.items()
    }
    ratios = [f["s_per_step"] / b["s_per_step"] for f, b in zip(runs["off"], runs["bf16"], strict=True)]
    record = {
        "format": "avss-bench-autocast/1",
        "command": f"python benchmarks/{command_line()}",
        "date": utc_now(),
        "machine": machine(),
        "steps": args.steps,
        "rows_per_step": 12,
        "runs": runs,
        "summary": summary,
        "speedup_per_repeat": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", record)
    lines = [
        "# bfloat16 autocast vs float32 training on CPU",
        "",
        f"{record['date']}, {describe_machine(record['machine'])}, torch {torch.__version__}. "
        f"Command: `{record['command']}`",
        "",
        f"{args.steps} optimizer steps of the EAVSS mitigation loop (blocks {LAYERS}, 12 rows per step) per "
        f"run, {args.repeats} repeats alternating the modes; the float32 weights and optimizer are the same "
        "in both, only the forward passes differ.",
        "",
        "| mode | median s / step | mean training loss per repeat |",
        "|---|---|---|",
        *(
            f"| {'float32' if mode == 'off' else 'bf16 autocast'} | {s['median_s_per_step']:.3f} | "
            + ", ".join(f"{v:.4f}" for v in s["train_loss"])
            + " |"
            for mode, s in summary.items()
        ),
        "",
        "Speed-up (float32 time / bf16 time) per repeat: " + ", ".join(f"{r:.2f}" for r in ratios) + ".",
        "",
    ]
    atomic_write_text(args.out / "README.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
