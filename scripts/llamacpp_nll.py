"""Summed next-token NLL of a GGUF model under llama.cpp (llama-cpp-python), on given token ids.

Used by the slow GGUF test to check that a pruned GGUF means the same model to llama.cpp as to transformers:
both score the same token ids in the same disjoint windows, so tokenizer differences cannot enter. Runs in
any interpreter with ``llama_cpp`` and ``numpy`` (it does not import avss), e.g. a separate venv:

    python scripts/llamacpp_nll.py MODEL.gguf ids.json --window 512   # prints {"nll": ..., "tokens": ...}

``ids.json`` holds a list of token ids. Each window of ``--window`` ids is evaluated from a fresh context and
its tokens 1..n-1 are scored, exactly as the test scores them with transformers.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("ids")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from llama_cpp import Llama

    with open(args.ids) as handle:
        ids = json.load(handle)
    llm = Llama(
        args.model,
        n_ctx=args.window,
        n_batch=args.window,
        n_ubatch=args.window,
        logits_all=True,
        n_threads=args.threads,
        verbose=False,
    )
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, args.window):
        window = ids[start : start + args.window]
        if len(window) < 2:
            break
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        targets = np.asarray(window[1:])
        total -= float(logprobs[np.arange(len(window) - 1), targets].sum())
        count += len(window) - 1
    print(json.dumps({"nll": total, "tokens": count}))


if __name__ == "__main__":
    main()
