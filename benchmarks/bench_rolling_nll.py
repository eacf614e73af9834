"""Time WikiText-2 perplexity scoring (``LanguageModel.rolling_nll``) for the avss on ``PYTHONPATH``.

An A/B of two code versions runs this twice with the study's settings, alternating, on a quiet machine::

    PYTHONPATH=NEW/src .venv/bin/python benchmarks/bench_rolling_nll.py --label new
    PYTHONPATH=OLD/src .venv/bin/python benchmarks/bench_rolling_nll.py --label old

Each run loads the model once, warms up on 10 documents and prints wall and process CPU time of each round
and the summed NLL (which must be identical between versions that claim the same numerics).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from avss.evaluation.engine import LanguageModel
from avss.evaluation.tasks.perplexity import WikiText2
from avss.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--documents", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=args.dtype)
    docs, _ = WikiText2().load(args.data_dir)
    texts = [doc["text"] for doc in docs][: args.documents]
    lm = LanguageModel(loaded.model, loaded.tokenizer, batch_size=args.batch_size)
    lm.rolling_nll(texts[:10], max_length=args.max_length)
    for _ in range(args.rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        nll = lm.rolling_nll(texts, max_length=args.max_length)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"{args.label} wall {wall:.1f} s, cpu {cpu:.1f} s, nll {nll.total!r} over {nll.num_tokens} tokens"
        )
    print(f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
