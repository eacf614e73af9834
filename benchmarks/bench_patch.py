"""``--patch linear`` on a real model: perplexity of the same pruned model with and without the patch.

Prunes once with the patch (``prune``, the path of ``avss prune``), removes the same blocks from a
fresh copy without it, and evaluates both (plus the unpruned model) on the bundled evaluation text and, when
the data directory is present, WikiText-2 test. Usage::

    .venv/bin/python benchmarks/bench_patch.py --model smollm2-135m --method block_influence \\
        --fraction 0.25 --wikitext-limit 200 --out benchmarks/patch_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import avss
from avss.adapters import remove_layers
from avss.data import CalibrationOptions, TextSource, resolve_data_dir
from avss.io import atomic_write_json
from avss.provenance import machine, package_versions, utc_now
from avss.pruning.prune import prune
from avss.pruning.rules import PruneSpec
from avss.scorers import get_scorer


def perplexities(model, tokenizer, wikitext_limit: int | None) -> dict[str, dict[str, float]]:
    """Perplexity and scored tokens on the bundled evaluation text and (data directory present) WikiText-2."""
    tasks = ["perplexity"] + (["wikitext2"] if resolve_data_dir(None) is not None else [])
    result = {}
    for task in tasks:
        limit = wikitext_limit if task == "wikitext2" else None
        evaluation = avss.evaluate(model, tokenizer, [task], limit=limit, data_source="local").tasks[task]
        tokens = sum(record.num_tokens or 0 for record in evaluation.records)
        result[task] = {"perplexity": evaluation.metrics["perplexity"], "num_tokens": tokens}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="block_influence")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--ridge", type=float, default=0.0)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--wikitext-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/patch_smollm2.json"))
    args = parser.parse_args()

    loaded = avss.load_model(args.model, device="cpu")
    original = copy.deepcopy(loaded.model)
    calibration = CalibrationOptions(samples=args.samples, max_length=args.max_length)
    spec = PruneSpec(fraction=args.fraction, patch="linear", patch_ridge=args.ridge)
    started = time.perf_counter()
    result, _ = prune(loaded, get_scorer(args.method), TextSource(), calibration, spec, progress=False)
    prune_s = time.perf_counter() - started
    unpatched = copy.deepcopy(original)
    remove_layers(unpatched, result.removed)
    report = {
        "model": args.model,
        "method": args.method,
        "fraction": args.fraction,
        "removed": result.removed,
        "calibration": {
            "samples": args.samples,
            "max_length": args.max_length,
            "text": "bundled calibration",
        },
        "fit_tokens": result.record.patch["fit_tokens"],
        "patch": result.record.patch,
        "prune_and_patch_s": round(prune_s, 1),
        "perplexity": {
            "unpruned": perplexities(original, loaded.tokenizer, args.wikitext_limit),
            "pruned": perplexities(unpatched, loaded.tokenizer, args.wikitext_limit),
            "pruned_patched": perplexities(loaded.model, loaded.tokenizer, args.wikitext_limit),
        },
        "wikitext_limit": args.wikitext_limit,
        "parameters": {"pruned": unpatched.num_parameters(), "pruned_patched": loaded.model.num_parameters()},
        "machine": machine(),
        "versions": package_versions(),
        "date": utc_now(),
    }
    atomic_write_json(args.out, report)
    print(json.dumps(report["perplexity"], indent=2))


if __name__ == "__main__":
    main()
