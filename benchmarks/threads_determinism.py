"""Does torch's CPU thread count change a model's output? The same forward at 1 and at 2 threads, per dtype.

``--threads auto`` picks the thread count from the machine's load, so whether that can change a number
decides where avss may adapt it (``Study.adapts_threads``). Random token ids, a fixed seed, logits compared
bit for bit:

    .venv/bin/python benchmarks/threads_determinism.py --model smollm2-135m \\
        --out benchmarks/threads_determinism.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from avss.io import atomic_write_json
from avss.models import load_model
from avss.provenance import machine, package_versions, utc_now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(args.model, device="cpu", dtype=dtype, threads="1")
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
        logits = {}
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                logits.setdefault(threads, []).append(loaded.model(ids).logits.float())
        one, two = logits[1][0], logits[2][0]
        rows[dtype] = {
            "identical_across_threads": torch.equal(one, two),
            "max_abs_logit_difference": (one - two).abs().max().item(),
            "identical_on_rerun": torch.equal(logits[1][0], logits[1][1]),
            "argmax_agreement": (one.argmax(-1) == two.argmax(-1)).double().mean().item(),
        }
        print(dtype, rows[dtype])
    record = {
        "format": "avss-threads-determinism/1",
        "created": utc_now(),
        "model": args.model,
        "inputs": {"batch": args.batch, "length": args.length, "seed": 0},
        "machine": machine(),
        "versions": package_versions(),
        "dtypes": rows,
    }
    atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
