"""Attention-sublayer removal against block removal at equal parameters removed, on a real model.

One calibration pass scores blocks (block influence) and attention sublayers (LLM-Drop's attention influence);
for each block budget the attention budget holding the same parameters comes from
:func:`avss.pruning.sublayers.equal_parameter_budget`. Each pruned copy is evaluated on the bundled
evaluation text and, when the data directory is present, WikiText-2 test. Usage::

    .venv/bin/python benchmarks/bench_sublayers.py --model smollm2-135m --blocks 2,4,6 \\
        --wikitext-limit 200 --out benchmarks/sublayers_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import avss
from avss.adapters import remove_layers
from avss.data import CalibrationOptions, TextSource, resolve_data_dir
from avss.io import atomic_write_json
from avss.provenance import machine, package_versions, utc_now
from avss.pruning.rules import select_count
from avss.pruning.sublayers import equal_parameter_budget, remove_sublayers
from avss.scorers import context_for, get_scorer

METHODS = ("block_influence", "attn_influence", "random")


def perplexities(model, tokenizer, wikitext_limit: int | None) -> dict[str, float]:
    tasks = ["perplexity"] + (["wikitext2"] if resolve_data_dir(None) is not None else [])
    result = {}
    for task in tasks:
        limit = wikitext_limit if task == "wikitext2" else None
        evaluation = avss.evaluate(model, tokenizer, [task], limit=limit, data_source="local").tasks[task]
        result[task] = evaluation.metrics["perplexity"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="2,4,6", help="block budgets, comma-separated")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--wikitext-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sublayers_smollm2.json"))
    args = parser.parse_args()

    loaded = avss.load_model(args.model, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = CalibrationOptions(samples=args.samples, max_length=args.max_length)
    batches = calibration.batches(tokenizer, TextSource())
    scorers = {name: get_scorer(name) for name in METHODS}
    started = time.perf_counter()
    context = context_for(model, batches, scorers.values(), cached=False)
    scores = {name: scorer.score(context).scores for name, scorer in scorers.items()}
    scoring_s = time.perf_counter() - started
    rows = [{"method": "unpruned", "unit": None, "removed": [], "parameters_removed": 0,
             **perplexities(model, tokenizer, args.wikitext_limit)}]  # fmt: skip
    for blocks in (int(item) for item in args.blocks.split(",")):
        budget = equal_parameter_budget(model, blocks, "attn")
        for name in METHODS:
            pruned = copy.deepcopy(model)
            if name == "block_influence":
                removed = select_count(scores[name], blocks)
                remove_layers(pruned, removed)
                parameters = budget.block_parameters
            else:
                removed = select_count(scores[name], budget.sublayers)
                parameters = remove_sublayers(pruned, "attn", removed)
            rows.append(
                {
                    "method": name,
                    "unit": "block" if name == "block_influence" else "attn",
                    "block_budget": blocks,
                    "removed": removed,
                    "parameters_removed": parameters,
                    **perplexities(pruned, tokenizer, args.wikitext_limit),
                }
            )
            print(rows[-1], flush=True)
            del pruned
    report = {
        "model": loaded.source,
        "calibration": {"samples": args.samples, "max_length": args.max_length, "tokens": batches.num_tokens},
        "scores": {name: values.tolist() for name, values in scores.items()},
        "block_size": budget.block_size,
        "attention_size": budget.sublayer_size,
        "scoring_s": round(scoring_s, 1),
        "rows": rows,
        "date": utc_now(),
        "machine": machine(),
        "versions": package_versions(),
    }
    atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
